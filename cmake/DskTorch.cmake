# find_package(Torch) for deepseek_kernels, with the workarounds that a pip
# torch (a CUDA build: 2.x+cu13x) needs. Include after DskPython.cmake and,
# when DSK_WITH_CUDA is ON, after enable_language(CUDA).
#
# Afterwards the imported targets torch_cpu and c10 exist (and, for CUDA
# builds, torch_cuda, c10_cuda and CUDA::cudart); link those, not
# ${TORCH_LIBRARIES}.
#
# What torch's CMake config does, and what is done about it here:
#
# * A CUDA torch's Caffe2Config.cmake always includes Caffe2/public/cuda.cmake,
#   which calls find_package(CUDA), enable_language(CUDA) and fails ("Your
#   installed Caffe2 version uses CUDA but I cannot find the CUDA libraries")
#   when no toolkit is found. A CPU-only build needs none of it: cuda.cmake
#   returns at once when the target torch::cudart exists (its include guard),
#   so an empty torch::cudart is defined first. torch_cpu and c10 are then
#   complete targets; torch_cuda is defined but must not be linked.
#
# * With CUDA, cuda.cmake runs FindCUDA, which takes the toolkit root from the
#   first nvcc on PATH: a wrapper script such as /usr/local/bin/nvcc gives
#   /usr/local and "Could NOT find CUDA". CUDA_TOOLKIT_ROOT_DIR is set to the
#   toolkit that CMake's CUDA language found.
#
# * A pip CUDA torch gets nvrtc, cuBLAS, cuFFT, ... from pip's nvidia-* wheels,
#   not from the toolkit. Their CUDA_<lib>_LIBRARY cache variables are pointed
#   at site-packages/nvidia/cu<major>/lib, so the CUDA::<lib> targets and
#   ${TORCH_LIBRARIES} are complete (deepseek_kernels itself needs only cudart).
#
# * cuda.cmake overrides CMAKE_CUDA_ARCHITECTURES (sets it OFF) and appends its
#   own -gencode flags (from TORCH_CUDA_ARCH_LIST or a GPU probe) plus
#   --expt-extended-lambda etc. to CMAKE_CUDA_FLAGS. Both are restored after
#   find_package, so the flags of this project are the only ones.

if(DSK_TORCH_CMAKE_PREFIX_PATH)
  # Appended: a CMAKE_PREFIX_PATH or Torch_DIR given by the user wins.
  list(APPEND CMAKE_PREFIX_PATH "${DSK_TORCH_CMAKE_PREFIX_PATH}")
endif()

if(NOT DSK_WITH_CUDA)
  if(NOT TARGET torch::cudart)
    add_library(torch::cudart INTERFACE IMPORTED)
  endif()
  find_package(Torch REQUIRED)
else()
  if(NOT CUDA_TOOLKIT_ROOT_DIR)
    get_filename_component(_dsk_cuda_root "${CUDAToolkit_BIN_DIR}" DIRECTORY)
    set(CUDA_TOOLKIT_ROOT_DIR "${_dsk_cuda_root}" CACHE PATH
        "CUDA toolkit for torch's FindCUDA (default: the one CMake's CUDA language uses)")
  endif()

  # FindCUDA empties its CUDA_<lib>_LIBRARY cache entries (those filled below)
  # when CUDA_TOOLKIT_ROOT_DIR differs from the root it saw last time, which on
  # the first run is none: record the root as already seen.
  if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR_INTERNAL)
    set(CUDA_TOOLKIT_ROOT_DIR_INTERNAL "${CUDA_TOOLKIT_ROOT_DIR}" CACHE INTERNAL "")
  endif()

  # pip CUDA libraries: fill CUDA_<lib>_LIBRARY where the toolkit lacks <lib>.
  # Names are globbed: the wheels ship only versioned files (libnvrtc.so.13,
  # libcufft.so.12), which find_library does not find by "nvrtc".
  foreach(_dsk_lib IN ITEMS nvrtc cublas cublasLt cufft curand cusparse cusolver cupti nvJitLink)
    if(CUDA_${_dsk_lib}_LIBRARY)
      continue()
    endif()
    set(_dsk_found "")
    foreach(_dsk_dir IN LISTS CUDAToolkit_LIBRARY_DIR DSK_PIP_CUDA_LIBRARY_DIRS)
      file(GLOB _dsk_candidates "${_dsk_dir}/lib${_dsk_lib}.so" "${_dsk_dir}/lib${_dsk_lib}.so.*")
      if(_dsk_candidates)
        list(SORT _dsk_candidates)
        list(GET _dsk_candidates 0 _dsk_found)
        break()
      endif()
    endforeach()
    if(_dsk_found)
      # FORCE: find_package(CUDAToolkit) has already cached <lib>-NOTFOUND.
      set(CUDA_${_dsk_lib}_LIBRARY "${_dsk_found}" CACHE FILEPATH "CUDA ${_dsk_lib} library" FORCE)
    endif()
  endforeach()

  set(_dsk_saved_cuda_archs "${CMAKE_CUDA_ARCHITECTURES}")
  set(_dsk_saved_cuda_flags "${CMAKE_CUDA_FLAGS}")
  # Hidden while torch's config runs: it warns "pytorch is not compatible with
  # CMAKE_CUDA_ARCHITECTURES and will ignore its value" whenever it is defined.
  unset(CMAKE_CUDA_ARCHITECTURES)
  unset(CMAKE_CUDA_ARCHITECTURES CACHE)
  # Keep torch's arch selection from probing for a GPU; its flags are dropped.
  if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
    dsk_cmake_archs_to_torch("${_dsk_saved_cuda_archs}" _dsk_torch_archs)
    if(_dsk_torch_archs)
      set(TORCH_CUDA_ARCH_LIST "${_dsk_torch_archs}")
    endif()
  endif()

  find_package(Torch REQUIRED)

  unset(CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES "${_dsk_saved_cuda_archs}" CACHE STRING
      "CUDA architectures to compile for" FORCE)
  set(CMAKE_CUDA_FLAGS "${_dsk_saved_cuda_flags}")

  foreach(_dsk_target IN ITEMS torch_cuda c10_cuda CUDA::cudart)
    if(NOT TARGET ${_dsk_target})
      message(FATAL_ERROR "deepseek_kernels: DSK_WITH_CUDA=ON but torch's CMake config defined "
                          "no ${_dsk_target}: is ${Torch_DIR} a CPU-only torch?")
    endif()
  endforeach()
endif()

# Caffe2's mkl.cmake gives caffe2::mkl (linked by torch_cpu) the link
# directories ${MKL_ROOT}/lib/intel64 etc. even when no MKL was found, which
# puts /lib/intel64... into the link line and the RPATH. pip's torch links MKL
# statically; drop them when MKL_ROOT is unset.
if(TARGET caffe2::mkl AND NOT MKL_ROOT)
  set_property(TARGET caffe2::mkl PROPERTY INTERFACE_LINK_DIRECTORIES "")
endif()

foreach(_dsk_target IN ITEMS torch_cpu c10)
  if(NOT TARGET ${_dsk_target})
    message(FATAL_ERROR "deepseek_kernels: torch's CMake config (${Torch_DIR}) defined no "
                        "${_dsk_target} target")
  endif()
endforeach()
