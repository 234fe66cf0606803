// Argument checks for the host glue: every message names the op, the argument,
// what was expected and what was given.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <sstream>
#include <string>

#include "common/dtype.h"

namespace dsk {

inline std::string dtype_list(std::initializer_list<at::ScalarType> allowed) {
  std::ostringstream os;
  bool first = true;
  for (auto t : allowed) {
    os << (first ? "" : ", ") << t;
    first = false;
  }
  return os.str();
}

// A required Tensor argument given None arrives undefined: name it, instead of
// the first property read failing with a message that names nothing.
inline void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), op, ": argument '", name, "' must be a Tensor, got None");
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t,
                        std::initializer_list<at::ScalarType> allowed) {
  check_defined(op, name, t);
  bool ok = false;
  for (auto a : allowed) ok = ok || t.scalar_type() == a;
  TORCH_CHECK_TYPE(ok, op, ": argument '", name, "' must have dtype ", dtype_list(allowed),
                   ", got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* ref_name, const at::Tensor& ref) {
  check_defined(op, name, t);
  check_defined(op, ref_name, ref);
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": argument '", name,
                    "' must be on the same device as '", ref_name, "' (", ref.device(),
                    "), got ", t.device());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  check_defined(op, name, t);
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": argument '", name, "' must be ", dim,
                    "-D, got shape ", t.sizes());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        at::IntArrayRef expected) {
  check_defined(op, name, t);
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": argument '", name, "' must have shape ",
                    expected, ", got ", t.sizes());
}

inline void check_positive(const char* op, const char* name, int64_t value) {
  TORCH_CHECK_VALUE(value > 0, op, ": argument '", name, "' must be positive, got ", value);
}

inline void check_supported_device(const char* op, const char* name, const at::Tensor& t) {
  check_defined(op, name, t);
  TORCH_CHECK_VALUE(t.is_cpu() || t.is_cuda(), op, ": argument '", name,
                    "' must be a CPU or CUDA tensor, got ", t.device());
#ifndef DSK_WITH_CUDA
  TORCH_CHECK_VALUE(!t.is_cuda(), op, ": argument '", name,
                    "' is a CUDA tensor, but deepseek_kernels was built without CUDA kernels "
                    "(rebuild with nvcc available, see README 'Build knobs')");
#endif
}

inline DType to_dsk_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK_TYPE(false, "deepseek_kernels: unsupported dtype ", t);
  }
}

// Group offsets of a packed operand (CPU tensors: read on the host): they start
// at 0, never decrease and end at rows_name.size(0) = rows (with end_at_most:
// at most there, the rows past them padding).
inline void check_offsets_cpu(const char* op, const at::Tensor& offsets, int64_t rows,
                              const char* rows_name = "x", bool end_at_most = false) {
  const at::Tensor o = offsets.to(at::kLong).contiguous();
  const int64_t* v = o.data_ptr<int64_t>();
  const int64_t n = o.numel();
  TORCH_CHECK_VALUE(v[0] == 0, op, ": argument 'offsets' must start at 0, got ", v[0]);
  for (int64_t g = 0; g + 1 < n; ++g) {
    TORCH_CHECK_VALUE(v[g + 1] >= v[g], op,
                      ": argument 'offsets' must be non-decreasing, got offsets[", g, "] = ", v[g],
                      " > offsets[", g + 1, "] = ", v[g + 1]);
  }
  TORCH_CHECK_VALUE(end_at_most ? v[n - 1] <= rows : v[n - 1] == rows, op, ": argument 'offsets' must end ",
                    end_at_most ? "at most " : "", "at ", rows_name, ".size(0) = ", rows, ", got offsets[", n - 1,
                    "] = ", v[n - 1]);
}

// Ceil division for non-negative 64-bit sizes a and positive b (no overflow
// for any b: a + b - 1 could wrap).
inline int64_t ceil_div(int64_t a, int64_t b) { return a == 0 ? 0 : (a - 1) / b + 1; }

}  // namespace dsk
