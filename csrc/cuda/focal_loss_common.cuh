// Device code shared by the CUDA focal-loss row kernels (focal_loss_kernels.cuh, the general one,
// and focal_loss_sparse_kernels.cu, the class-index fast path): gamma from the launch's schedule,
// one value stored in the loss's dtype, and the deterministic sum of the reduced loss.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_utils.cuh"
#include "focal_loss_launch.h"

namespace calibkernels {

__device__ __forceinline__ void store_value(void* dst, int64_t i, DType d, double v) {
  switch (d) {
    case DType::Float32: static_cast<float*>(dst)[i] = static_cast<float>(v); break;
    case DType::Float64: static_cast<double*>(dst)[i] = v; break;
    case DType::Float16: static_cast<__half*>(dst)[i] = __double2half(v); break;
    case DType::BFloat16:
      static_cast<__nv_bfloat16*>(dst)[i] = __float2bfloat16_rn(static_cast<float>(v));
      break;
  }
}

// One value of a tensor in any of the kernels' dtypes, in the math type A.
template <typename A>
__device__ __forceinline__ A load_value(const void* src, int64_t i, DType d) {
  switch (d) {
    case DType::Float32: return static_cast<A>(static_cast<const float*>(src)[i]);
    case DType::Float64: return static_cast<A>(static_cast<const double*>(src)[i]);
    case DType::Float16: return static_cast<A>(__half2float(static_cast<const __half*>(src)[i]));
    default: return static_cast<A>(__bfloat162float(static_cast<const __nv_bfloat16*>(src)[i]));
  }
}

// select_gamma of the launch's schedule: from the kernel parameters, or from a table on the
// device (read in place: a copy of the schedule would live in local memory).
template <typename A>
__device__ __forceinline__ A launch_gamma(const FocalLossLaunch& p, A p_y) {
  if (p.table == nullptr) return select_gamma(p.schedule, p_y);
  const int n = p.schedule.n;
  double g = p.table[2 * n];
  for (int j = 0; j < n; ++j) {
    if (p_y < static_cast<A>(p.table[j])) {
      g = p.table[n + j];
      break;
    }
  }
  return g >= 0.0 && g <= 1e300 ? static_cast<A>(g) : static_cast<A>(NAN);
}

// The mean's divisor: the prepare kernel's parts added in one fixed order.
__device__ __forceinline__ double mean_divisor(const FocalLossLaunch& p) {
  double d = 0.0;
#pragma unroll 16
  for (int j = 0; j < kDivisorParts; ++j) d += p.divisor_parts[j];
  return d;
}

// The reduced loss, after every row of the block: each block's partial (thread 0's block_loss),
// then the last block to finish sums them in block order (deterministic, graph-safe) and writes
// the loss in its dtype. Every thread of the block calls it.
__device__ __forceinline__ void finish_reduced_loss(const FocalLossLaunch& p, double block_loss) {
  __shared__ bool last_block;
  __shared__ double smem_total[256];
  if (threadIdx.x == 0) {
    p.partials[blockIdx.x] = block_loss;
    __threadfence();
    last_block = atomicAdd(p.ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  double acc = 0.0;
  const volatile double* partials = p.partials;
  for (unsigned j = threadIdx.x; j < gridDim.x; j += blockDim.x) acc += partials[j];
  const int width = blockDim.x < 256 ? blockDim.x : 256;
  if (threadIdx.x < 256) smem_total[threadIdx.x] = 0.0;
  __syncthreads();
  for (unsigned t = 0; t < blockDim.x; t += 256) {  // fold blockDim.x partial sums onto 256
    if (threadIdx.x >= t && threadIdx.x < t + 256) smem_total[threadIdx.x - t] += acc;
    __syncthreads();
  }
  for (int half = width / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) smem_total[threadIdx.x] += smem_total[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double total = smem_total[0];
    store_value(p.loss, 0, p.out_dtype,
                p.reduction == ReductionKind::Mean ? total / mean_divisor(p) : total);
    *p.ticket = 0u;  // ready for the next call on this workspace
  }
}

}  // namespace calibkernels
