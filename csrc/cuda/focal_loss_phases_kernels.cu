// The focal loss's phases over a window of classes on CUDA (csrc/cpu/focal_loss_phases_cpu.cpp is
// the CPU's): a warp per row for the window passes, a thread per row for the epilogue. The math
// is ../focal_loss_row.h's, as every kernel's. Targets outside the window are simply absent here;
// one outside [0, n_classes) makes its row NaN (the host cannot check it without a sync).
#include <cuda_runtime.h>

#include <climits>

#include "cuda_utils.cuh"
#include "focal_loss_phases_launch.h"

namespace calibkernels {
namespace {

constexpr int kWarps = 8;  // rows (warps) per block

unsigned row_blocks(int64_t n_rows) {
  const int64_t blocks = (n_rows + kWarps - 1) / kWarps;
  return static_cast<unsigned>(blocks < 1048576 ? (blocks > 0 ? blocks : 1) : 1048576);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(32 * kWarps) partial_stats_kernel(FocalPhasesLaunch p) {
  using A = typename MathType<T>::type;
  const T* __restrict__ x = static_cast<const T*>(p.input);
  A* __restrict__ out = static_cast<A*>(p.out);
  const int lane = threadIdx.x % 32;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; r < p.n_rows;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    const T* __restrict__ row = x + r * p.width;
    A m = -INFINITY;
    for (int64_t k = lane; k < p.width; k += 32) m = fmax(m, to_math(row[k]));
#pragma unroll
    for (int off = 16; off > 0; off /= 2) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, off));
    A n_max = 0, rest = 0;
    for (int64_t k = lane; k < p.width; k += 32) {
      const A v = to_math(row[k]);
      if (v == m) n_max += A(1);
      else rest += ck_exp(v - m);  // a NaN lands here and makes the row NaN, as in torch
    }
    n_max = warp_sum(n_max);
    rest = warp_sum(rest);
    if (lane == 0) {
      const int64_t y = p.target[r] - p.class_offset;
      const bool holds = p.target[r] != p.ignore_index && y >= 0 && y < p.width;
      A* o = out + r * 4;
      o[0] = m;
      o[1] = n_max;
      o[2] = rest;
      o[3] = holds ? to_math(row[y]) : A(-INFINITY);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(32 * kWarps) partial_sums_kernel(FocalPhasesLaunch p) {
  using A = typename MathType<T>::type;
  const T* __restrict__ x = static_cast<const T*>(p.input);
  const A* __restrict__ g = static_cast<const A*>(p.row_stats);
  A* __restrict__ out = static_cast<A*>(p.out);
  const A b = static_cast<A>(p.smoothing / static_cast<double>(p.n_classes));
  const int lane = threadIdx.x % 32;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; r < p.n_rows;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t y = p.target[r];
    const A m = g[r * 4], log_s = log_sum_exp_shifted(g[r * 4 + 1], g[r * 4 + 2]);
    const A gamma = select_gamma(p.schedule, ck_exp((g[r * 4 + 3] - m) - log_s));
    A sum_af = 0, sum_aG = 0;
    if (y != p.ignore_index) {
      const T* __restrict__ row = x + r * p.width;
      for (int64_t k = lane; k < p.width; k += 32) {
        const FocalTerms<A> t = focal_terms((to_math(row[k]) - m) - log_s, gamma);
        sum_af += b * t.f;
        if (k + p.class_offset != y) sum_aG += b * t.G;
      }
    }
    sum_af = warp_sum(sum_af);
    sum_aG = warp_sum(sum_aG);
    if (lane == 0) {
      out[r * 2] = sum_af;
      out[r * 2 + 1] = sum_aG;
    }
  }
}

template <typename A>
__global__ void finish_kernel(FocalPhasesLaunch p) {
  const A* __restrict__ g = static_cast<const A*>(p.row_stats);
  const A* __restrict__ sums = static_cast<const A*>(p.sums);
  A* __restrict__ loss = static_cast<A*>(p.out);
  A* __restrict__ stats = static_cast<A*>(p.out_stats);
  const A eps = static_cast<A>(p.smoothing), c1 = A(1) - eps;
  const A b = static_cast<A>(p.smoothing / static_cast<double>(p.n_classes));
  const A scale = p.divisor != nullptr ? A(1) / static_cast<A>(*p.divisor) : A(1);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n_rows;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t y = p.target[i];
    RowStats<A> r{};
    A row_loss = 0;
    if (y != p.ignore_index) {
      const bool bad = y < 0 || y >= p.n_classes;
      r.m = g[i * 4];
      r.s = g[i * 4 + 1] + g[i * 4 + 2];
      r.log_s = log_sum_exp_shifted(g[i * 4 + 1], g[i * 4 + 2]);
      const A lp_y = (g[i * 4 + 3] - r.m) - r.log_s;
      const A p_y = ck_exp(lp_y);
      r.gamma = select_gamma(p.schedule, p_y);
      const FocalTerms<A> ty = focal_terms(lp_y, p_y, r.gamma);
      const A S_other = sums != nullptr ? sums[i * 2 + 1] : A(0);
      const A aG_y = (c1 + b) * ty.G;
      r.S = S_other + aG_y;
      r.g_y = true_class_grad(ty, S_other, aG_y);
      r.scale = scale;
      row_loss = -(c1 * ty.f + (sums != nullptr ? sums[i * 2] : A(0)));
      if (bad || poisoned_max(r.m)) row_loss = r.S = r.g_y = A(NAN);
    }
    loss[i] = row_loss;
    A* o = stats + i * kRowStats;
    o[0] = r.m; o[1] = r.s; o[2] = r.log_s; o[3] = r.gamma; o[4] = r.S; o[5] = r.g_y; o[6] = r.scale;
  }
}

template <typename T>
__global__ void __launch_bounds__(32 * kWarps) window_grad_kernel(FocalPhasesLaunch p) {
  using A = typename MathType<T>::type;
  const T* __restrict__ x = static_cast<const T*>(p.input);
  const A* __restrict__ st = static_cast<const A*>(p.stats);
  const A* __restrict__ go = static_cast<const A*>(p.grad_output);
  T* __restrict__ out = static_cast<T*>(p.out);
  const A eps = static_cast<A>(p.smoothing);
  const A b = static_cast<A>(p.smoothing / static_cast<double>(p.n_classes));
  const bool dense = eps > A(0);
  const int lane = threadIdx.x % 32;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; r < p.n_rows;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t y_global = p.target[r];
    const bool ignored = y_global == p.ignore_index;
    const bool bad = !ignored && (y_global < 0 || y_global >= p.n_classes);
    const int64_t y = y_global - p.class_offset;  // in this window when 0 <= y < width
    const A* s = st + r * kRowStats;
    const RowStats<A> rs{s[0], s[1], s[2], s[3], s[4], s[5], s[6]};
    const A coef = go[p.per_row ? r : 0] * rs.scale;
    const A inv_s = A(1) / rs.s;
    const T* __restrict__ row = x + r * p.width;
    T* __restrict__ grow = out + r * p.width;
    for (int64_t k = lane; k < p.width; k += 32) {
      A g;
      if (ignored) {
        g = 0;
      } else if (bad) {
        g = A(NAN);
      } else if (k == y) {
        g = rs.g_y * coef;
      } else {
        const A v = to_math(row[k]);
        const A p_k = ck_exp(v - rs.m) * inv_s;
        const A aG = !dense ? A(0)
                            : b * (rs.gamma == A(0) ? A(1)
                                                    : focal_terms((v - rs.m) - rs.log_s,
                                                                  rs.gamma).G);
        g = (p_k * rs.S - aG) * coef;
      }
      grow[k] = from_math<T>(g);
    }
  }
}

}  // namespace

cudaError_t launch_focal_partial_stats(const FocalPhasesLaunch& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    partial_stats_kernel<decltype(tag)><<<row_blocks(p.n_rows), 32 * kWarps, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_focal_partial_sums(const FocalPhasesLaunch& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    partial_sums_kernel<decltype(tag)><<<row_blocks(p.n_rows), 32 * kWarps, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_focal_finish(const FocalPhasesLaunch& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  const int64_t blocks = (p.n_rows + 255) / 256;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
  if (p.dtype == DType::Float64) finish_kernel<double><<<grid, 256, 0, stream>>>(p);
  else finish_kernel<float><<<grid, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_focal_window_grad(const FocalPhasesLaunch& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    window_grad_kernel<decltype(tag)><<<row_blocks(p.n_rows), 32 * kWarps, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace calibkernels
