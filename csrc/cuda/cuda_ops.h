// Helpers of the CUDA op implementations (.cpp, torch side): the launchers' dtype and alignment.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "dtype.h"

namespace calibkernels {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    case at::kDouble: return DType::Float64;
    default: TORCH_CHECK_VALUE(false, "calibkernels: unsupported dtype ", t);
  }
}

// The floating dtypes the kernels read (to_dtype's).
inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// 16-byte vector loads need every row to start aligned: rows of a multiple of 16 bytes, and an
// aligned base pointer.
inline bool rows_aligned16(const at::Tensor& t) {
  return (t.size(-1) * t.element_size()) % 16 == 0 && aligned16(t);
}

}  // namespace calibkernels
