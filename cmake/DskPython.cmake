# Ask the Python interpreter that has torch installed where torch's CMake
# package and pip's NVIDIA CUDA wheels are, so that a plain
#   cmake -S . -B /tmp/build
# works without -DCMAKE_PREFIX_PATH. Nothing here is required: with Torch_DIR
# or CMAKE_PREFIX_PATH pointing at a libtorch, and no Python at all, the build
# still configures (CUDA builds then may need the cache variables documented
# in docs/cmake.md).
#
# Input (either, optional):
#   Python3_EXECUTABLE / DSK_PYTHON_EXECUTABLE   the interpreter (default: python3 on PATH)
# Output (normal variables):
#   DSK_TORCH_CMAKE_PREFIX_PATH   torch.utils.cmake_prefix_path, or empty
#   DSK_TORCH_VERSION             torch.__version__, or empty
#   DSK_TORCH_CUDA_VERSION        torch.version.cuda ("13.0"), empty for a CPU torch
#   DSK_NVIDIA_DIRS               folders of the `nvidia` namespace package (pip CUDA wheels)
# and the function dsk_find_pip_cuda(<cuda major version>).

if(DEFINED Python3_EXECUTABLE AND NOT DEFINED DSK_PYTHON_EXECUTABLE)
  set(DSK_PYTHON_EXECUTABLE "${Python3_EXECUTABLE}" CACHE FILEPATH
      "Python interpreter that has torch installed")
endif()
find_program(DSK_PYTHON_EXECUTABLE NAMES python3 python
             DOC "Python interpreter that has torch installed")

set(DSK_TORCH_CMAKE_PREFIX_PATH "")
set(DSK_TORCH_VERSION "")
set(DSK_TORCH_CUDA_VERSION "")
set(DSK_NVIDIA_DIRS "")

if(DSK_PYTHON_EXECUTABLE)
  # Importing torch takes a second or two: do it once per interpreter and
  # keep the answer in the cache.
  if(NOT "${_DSK_PY_QUERY_KEY}" STREQUAL "${DSK_PYTHON_EXECUTABLE}")
    execute_process(
      COMMAND "${DSK_PYTHON_EXECUTABLE}" "${CMAKE_CURRENT_LIST_DIR}/dsk_query_python.py"
      OUTPUT_VARIABLE _dsk_py_out
      ERROR_VARIABLE _dsk_py_err
      RESULT_VARIABLE _dsk_py_rc)
    if(NOT _dsk_py_rc EQUAL 0)
      message(WARNING "deepseek_kernels: ${DSK_PYTHON_EXECUTABLE} failed to run "
                      "cmake/dsk_query_python.py (${_dsk_py_rc}): ${_dsk_py_err}")
      set(_dsk_py_out "")
    endif()
    # One list item per line (a cache value cannot hold newlines).
    string(REPLACE ";" "\\;" _dsk_py_out "${_dsk_py_out}")
    string(REPLACE "\n" ";" _dsk_py_out "${_dsk_py_out}")
    set(_DSK_PY_QUERY_OUT "${_dsk_py_out}" CACHE INTERNAL "")
    set(_DSK_PY_QUERY_KEY "${DSK_PYTHON_EXECUTABLE}" CACHE INTERNAL "")
  endif()

  foreach(_dsk_line IN LISTS _DSK_PY_QUERY_OUT)
    if(_dsk_line MATCHES "^torch_cmake_prefix_path=(.*)$")
      set(DSK_TORCH_CMAKE_PREFIX_PATH "${CMAKE_MATCH_1}")
    elseif(_dsk_line MATCHES "^torch_version=(.*)$")
      set(DSK_TORCH_VERSION "${CMAKE_MATCH_1}")
    elseif(_dsk_line MATCHES "^torch_cuda_version=(.*)$")
      set(DSK_TORCH_CUDA_VERSION "${CMAKE_MATCH_1}")
    elseif(_dsk_line MATCHES "^nvidia_dir=(.*)$")
      list(APPEND DSK_NVIDIA_DIRS "${CMAKE_MATCH_1}")
    elseif(_dsk_line MATCHES "^error=(.*)$")
      message(STATUS "deepseek_kernels: ${CMAKE_MATCH_1}")
    endif()
  endforeach()
endif()

# dsk_find_pip_cuda(<major>)
#
# Fills two cache variables (left alone when already set, so they can be
# given on the command line) with the folders of pip's CUDA wheels:
#   DSK_PIP_CUDA_INCLUDE_DIRS  nvidia/cu<major>/include (CUDA 13 wheels), or the
#                              per-library include folders of CUDA 12 wheels
#   DSK_PIP_CUDA_LIBRARY_DIRS  the matching lib folders
# A pip CUDA torch needs no system cuBLAS/cuSPARSE/nvrtc: they come as wheels,
# and torch's headers (ATen/cuda/CUDAContext.h) include cublas_v2.h and friends.
function(dsk_find_pip_cuda major)
  set(_inc "")
  set(_lib "")
  foreach(_root IN LISTS DSK_NVIDIA_DIRS)
    if(IS_DIRECTORY "${_root}/cu${major}")
      # CUDA 13 wheels: one folder for every CUDA library.
      set(_subdirs "cu${major}")
    else()
      # CUDA 12 wheels: one folder per library.
      set(_subdirs cublas cusparse cusolver curand cufft cuda_nvrtc cuda_cupti nvjitlink)
    endif()
    foreach(_sub IN LISTS _subdirs)
      if(IS_DIRECTORY "${_root}/${_sub}/include")
        list(APPEND _inc "${_root}/${_sub}/include")
      endif()
      if(IS_DIRECTORY "${_root}/${_sub}/lib")
        list(APPEND _lib "${_root}/${_sub}/lib")
      endif()
    endforeach()
  endforeach()
  if(NOT DEFINED DSK_PIP_CUDA_INCLUDE_DIRS)
    set(DSK_PIP_CUDA_INCLUDE_DIRS "${_inc}" CACHE STRING
        "Include folders of pip's CUDA wheels (searched after the toolkit's own headers)")
  endif()
  if(NOT DEFINED DSK_PIP_CUDA_LIBRARY_DIRS)
    set(DSK_PIP_CUDA_LIBRARY_DIRS "${_lib}" CACHE STRING
        "Library folders of pip's CUDA wheels (libnvrtc, libcublas, ...)")
  endif()
endfunction()
