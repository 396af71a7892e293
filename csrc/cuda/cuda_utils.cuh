// Device helpers shared by the CUDA kernels: the math type of each dtype, conversions, a 16-byte
// pack for vectorized loads and stores, and a chunk of a row loaded through it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace calibkernels {

template <typename T>
struct MathType {
  using type = float;
};
template <>
struct MathType<double> {
  using type = double;
};

__device__ __forceinline__ float to_math(float v) { return v; }
__device__ __forceinline__ double to_math(double v) { return v; }
__device__ __forceinline__ float to_math(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_math(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_math(typename MathType<T>::type v);
template <>
__device__ __forceinline__ float from_math<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_math<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_math<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_math<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int VEC>
struct alignas(16) Pack {
  T v[VEC];
};

// Loads the VEC values at [base, base + VEC) of a row: one 16-byte load where every row starts
// 16-byte aligned (then C % VEC == 0: a chunk that starts in the row ends in it), else element by
// element, with 0 past the row's end.
template <typename T, int VEC>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int64_t base, int64_t C,
                                           bool vectorized,
                                           typename MathType<T>::type (&v)[VEC]) {
  using A = typename MathType<T>::type;
  if (vectorized) {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(row + base);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = to_math(pk.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = base + k < C ? to_math(row[base + k]) : A(0);
  }
}

// Calls launch(T{}) with T the storage type of dtype: one switch for every launcher.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& launch) {
  switch (dtype) {
    case DType::Float32: return launch(float{});
    case DType::Float16: return launch(__half{});
    case DType::BFloat16: return launch(__nv_bfloat16{});
    case DType::Float64: return launch(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace calibkernels
