// The Python extension module deepseek_kernels._C. Importing it runs the
// static TORCH_LIBRARY registrations of the linked sources; pybind11 exposes
// the module's own helpers. (Not part of the CMake library for C++ users.)
#include <torch/extension.h>

#include "common/build_info.h"

namespace {

pybind11::dict build_info_dict() {
  pybind11::dict d;
  for (const auto& [key, value] : dsk::build_info()) {
    if (value == "true" || value == "false") {
      d[key.c_str()] = value == "true";
    } else if (key == "cuda_archs") {
      pybind11::list archs;
      size_t start = 0;
      while (start < value.size()) {
        size_t end = value.find(';', start);
        if (end == std::string::npos) end = value.size();
        if (end > start) archs.append(value.substr(start, end - start));
        start = end + 1;
      }
      d[key.c_str()] = archs;
    } else {
      d[key.c_str()] = value;
    }
  }
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "deepseek_kernels compiled extension (ops live in torch.ops.deepseek_kernels)";
  m.def("build_info", &build_info_dict, "How the extension was built.");
}
