# CUDA architectures: the default, TORCH_CUDA_ARCH_LIST (the knob setup.py
# reads), and the names reported by build_info. Include before
# enable_language(CUDA), which fixes CMAKE_CUDA_ARCHITECTURES.
#
# Precedence: -DCMAKE_CUDA_ARCHITECTURES=...  >  $CUDAARCHS (CMake's own)
#             >  $TORCH_CUDA_ARCH_LIST        >  DSK_DEFAULT_CUDA_ARCHITECTURES.
#
# CMake spelling: "80-real" = SASS for sm_80 only; "80-virtual" = PTX for
# compute_80 only; "80" = both; "90a-real" = sm_90a (wgmma/TMA, H100/H200 only).

set(DSK_DEFAULT_CUDA_ARCHITECTURES "80;90a-real")  # as setup.py: sm_80 + compute_80 PTX, sm_90a

# dsk_torch_arch_list_to_cmake(<TORCH_CUDA_ARCH_LIST value> <out var>)
# "8.0;9.0a" -> "80-real;90a-real"; "8.0+PTX" -> "80" (SASS and PTX).
function(dsk_torch_arch_list_to_cmake torch_list out_var)
  string(REGEX REPLACE "[ \t,]+" ";" _items "${torch_list}")
  set(_out "")
  foreach(_item IN LISTS _items)
    if(_item STREQUAL "")
      continue()
    endif()
    if(_item MATCHES "^([0-9]+)\\.([0-9])([af]?)(\\+PTX)?$")
      set(_arch "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
      if(CMAKE_MATCH_4)
        list(APPEND _out "${_arch}")
      else()
        list(APPEND _out "${_arch}-real")
      endif()
    else()
      message(FATAL_ERROR
        "deepseek_kernels: cannot read '${_item}' in TORCH_CUDA_ARCH_LIST='${torch_list}' "
        "(expected e.g. 8.0;9.0a;8.0+PTX). Pass -DCMAKE_CUDA_ARCHITECTURES=... instead.")
    endif()
  endforeach()
  set(${out_var} "${_out}" PARENT_SCOPE)
endfunction()

# dsk_cmake_archs_to_torch(<CMake architectures> <out var>)
# The reverse, for torch's own CMake code (which would otherwise probe the
# GPU): "80-real;90a-real" -> "8.0;9.0a". Leaves <out var> empty for
# values it cannot express (all, all-major, native).
function(dsk_cmake_archs_to_torch archs out_var)
  set(_out "")
  foreach(_arch IN LISTS archs)
    if(_arch MATCHES "^([0-9]+)([0-9])([af]?)(-real|-virtual)?$")
      set(_t "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
      if(NOT CMAKE_MATCH_4 STREQUAL "-real")
        string(APPEND _t "+PTX")
      endif()
      list(APPEND _out "${_t}")
    else()
      set(${out_var} "" PARENT_SCOPE)
      return()
    endif()
  endforeach()
  set(${out_var} "${_out}" PARENT_SCOPE)
endfunction()

# dsk_cuda_arch_names(<CMake architectures> <out var>)
# Names as setup.py reports them in build_info()["cuda_archs"]:
# "80-real;90a-real" -> "sm_80;sm_90a"; "80" -> "sm_80;compute_80";
# "90-virtual" -> "compute_90"; all/all-major/native stay as they are.
function(dsk_cuda_arch_names archs out_var)
  set(_out "")
  foreach(_arch IN LISTS archs)
    if(_arch MATCHES "^([0-9]+[a-z]?)-real$")
      list(APPEND _out "sm_${CMAKE_MATCH_1}")
    elseif(_arch MATCHES "^([0-9]+[a-z]?)-virtual$")
      list(APPEND _out "compute_${CMAKE_MATCH_1}")
    elseif(_arch MATCHES "^([0-9]+[a-z]?)$")
      list(APPEND _out "sm_${CMAKE_MATCH_1}" "compute_${CMAKE_MATCH_1}")
    else()
      list(APPEND _out "${_arch}")
    endif()
  endforeach()
  set(${out_var} "${_out}" PARENT_SCOPE)
endfunction()

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND "$ENV{CUDAARCHS}" STREQUAL "")
  if(NOT "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
    dsk_torch_arch_list_to_cmake("$ENV{TORCH_CUDA_ARCH_LIST}" _dsk_archs)
    set(_dsk_archs_doc "from TORCH_CUDA_ARCH_LIST=$ENV{TORCH_CUDA_ARCH_LIST}")
  else()
    set(_dsk_archs "${DSK_DEFAULT_CUDA_ARCHITECTURES}")
    set(_dsk_archs_doc "deepseek_kernels default")
  endif()
  set(CMAKE_CUDA_ARCHITECTURES "${_dsk_archs}" CACHE STRING
      "CUDA architectures to compile for (${_dsk_archs_doc})")
endif()

# sm_90 and sm_90a code run on the same GPUs (compute capability 9.0) and nothing
# says which one the driver loads; from sm_90 the wgmma kernels would trap. As
# setup.py: with 90a listed, plain 90 keeps only its PTX ("90" -> "90-virtual").
if(CMAKE_CUDA_ARCHITECTURES MATCHES "(^|;)90a")
  set(_dsk_filtered "")
  foreach(_arch IN LISTS CMAKE_CUDA_ARCHITECTURES)
    if(_arch STREQUAL "90")
      list(APPEND _dsk_filtered "90-virtual")
    elseif(NOT _arch STREQUAL "90-real")
      list(APPEND _dsk_filtered "${_arch}")
    endif()
  endforeach()
  if(NOT _dsk_filtered STREQUAL CMAKE_CUDA_ARCHITECTURES)
    message(WARNING "deepseek_kernels: CMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES} has "
                    "90 and 90a: building ${_dsk_filtered} (sm_90a code only)")
    set(CMAKE_CUDA_ARCHITECTURES "${_dsk_filtered}" CACHE STRING "CUDA architectures to compile for" FORCE)
  endif()
endif()
