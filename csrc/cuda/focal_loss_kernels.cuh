// The general fused focal loss on CUDA (CONTRACT §1), every case the class-index fast path
// (focal_loss_sparse_kernels.cu) does not take: one subgroup of TPR threads per row. A row is read
// once into registers when it fits (16-byte loads), its softmax statistics reduced across the
// subgroup, and its gradient and RowStats written once; longer rows stream with an online softmax
// and re-read only the part that did not fit. The reduced loss is summed in the row kernel
// (per-block partials, a ticket, the last block sums them in block order). The gradient phase
// (backward) rewrites the gradient from the input and the RowStats. No torch headers, no host
// synchronisation, deterministic reductions.
// DENSE (compile time): a target distribution over every class (probabilities, or label
// smoothing), where each element needs its own focal terms; without it the gradient off the true
// class is c p_j. Each dtype's kernels are instantiated in a file of their own
// (focal_loss_kernels_<dtype>.cu) so that nvcc compiles them in parallel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <type_traits>

#include "focal_loss_common.cuh"

namespace calibkernels {
namespace general {  // named, not anonymous: the typed launchers below are shared across files

constexpr int kItems = 4;  // 16-byte chunks per thread kept in registers

// Online softmax statistics of a set of logits: its max m, how many equal m (each adds exactly 1
// to sum exp(x - m)) and the sum of exp(x - m) over the rest (see log_sum_exp_shifted).
template <typename A>
struct SoftmaxState {
  A m, n_max, rest;
};

template <typename A>
__device__ __forceinline__ SoftmaxState<A> merge(const SoftmaxState<A>& a,
                                                 const SoftmaxState<A>& b) {
  const A m = a.m > b.m ? a.m : b.m;
  SoftmaxState<A> o;
  o.m = m;
  o.n_max = (a.m == m ? a.n_max : A(0)) + (b.m == m ? b.n_max : A(0));
  o.rest = (a.m == m ? a.rest : (a.rest + a.n_max) * ck_exp(a.m - m)) +
           (b.m == m ? b.rest : (b.rest + b.n_max) * ck_exp(b.m - m));
  return o;
}

// Shuffle-xor over TPR lanes, then (TPR > 32) across warps through shared memory in a fixed
// order: every thread of the subgroup gets the same, run-to-run identical result.
template <int TPR, typename A>
__device__ __forceinline__ SoftmaxState<A> reduce_state(SoftmaxState<A> s,
                                                        SoftmaxState<A>* smem) {
#pragma unroll
  for (int off = (TPR < 32 ? TPR : 32) / 2; off > 0; off /= 2) {
    SoftmaxState<A> o;
    o.m = __shfl_xor_sync(0xffffffffu, s.m, off);
    o.n_max = __shfl_xor_sync(0xffffffffu, s.n_max, off);
    o.rest = __shfl_xor_sync(0xffffffffu, s.rest, off);
    s = merge(s, o);
  }
  if constexpr (TPR > 32) {
    __syncthreads();  // smem may still be read by the previous reduction
    if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = s;
    __syncthreads();
    s = smem[0];
    for (int w = 1; w < TPR / 32; ++w) s = merge(s, smem[w]);
  }
  return s;
}

template <int TPR, typename A>
__device__ __forceinline__ A reduce_sum(A v, A* smem) {
#pragma unroll
  for (int off = (TPR < 32 ? TPR : 32) / 2; off > 0; off /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  if constexpr (TPR > 32) {
    __syncthreads();
    if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
    __syncthreads();
    v = smem[0];
    for (int w = 1; w < TPR / 32; ++w) v += smem[w];
  }
  return v;
}

// The probability targets of a chunk (element loads: any storage type, any alignment).
template <typename TT, typename A, int VEC>
__device__ __forceinline__ void load_targets(const TT* __restrict__ row, int64_t base, int64_t C,
                                             A (&t)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) t[k] = base + k < C ? static_cast<A>(to_math(row[base + k])) : A(0);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_chunk(T* __restrict__ row, int64_t base, int64_t C,
                                            bool vectorized,
                                            const typename MathType<T>::type (&g)[VEC]) {
  if (vectorized) {
    Pack<T, VEC> pk;
#pragma unroll
    for (int k = 0; k < VEC; ++k) pk.v[k] = from_math<T>(g[k]);
    *reinterpret_cast<Pack<T, VEC>*>(row + base) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (base + k < C) row[base + k] = from_math<T>(g[k]);
    }
  }
}

template <typename A, int VEC>
__device__ __forceinline__ void update_state(SoftmaxState<A>& s, const A (&v)[VEC], int64_t base,
                                             int64_t C) {
  A cm = -INFINITY;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    if (base + k < C) cm = v[k] > cm ? v[k] : cm;
  }
  if (cm > s.m) {
    s.rest = (s.rest + s.n_max) * ck_exp(s.m - cm);
    s.n_max = A(0);
    s.m = cm;
  }
  // No branch an element: exp for every one, then selects (its inf or NaN past the row, or at
  // an infinite max, is never added).
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const bool in_row = base + k < C, at_max = v[k] == s.m;
    const A e = ck_exp(v[k] - s.m);
    s.n_max += in_row && at_max ? A(1) : A(0);
    s.rest += in_row && !at_max ? e : A(0);
  }
}

// Visits this thread's chunks of the row: the first kItems from registers, the rest from memory.
template <typename T, int TPR, int VEC, typename F>
__device__ __forceinline__ void for_each_chunk(const T* __restrict__ row, int64_t C, int lane,
                                               bool vectorized,
                                               typename MathType<T>::type (&cache)[kItems][VEC],
                                               F&& f) {
  using A = typename MathType<T>::type;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t base = (static_cast<int64_t>(i) * TPR + lane) * VEC;
    if (base < C) f(base, cache[i]);
  }
  for (int64_t base = (static_cast<int64_t>(kItems) * TPR + lane) * VEC; base < C;
       base += static_cast<int64_t>(TPR) * VEC) {
    A v[VEC];
    load_chunk<T, VEC>(row, base, C, vectorized, v);
    f(base, v);
  }
}

// The gradient of one chunk from its logits v (RowStats r, coef = grad_output x r.scale):
// coef (p_k S - a_k G_k), with a_k G_k = 0 off the true class without DENSE; the true class of an
// index target coef g_y. `fill` for a sample that is ignored (0) or bad (NaN). Without DENSE the
// true class is found by a 32-bit test against its offset in the chunk; with it, by the 64-bit
// index (that form, or selects instead of branches, makes ptxas hold the DENSE forward at 80
// registers and spill the cached logits).
template <bool DENSE, typename A, typename TT, int VEC>
__device__ __forceinline__ void grad_chunk(const A (&v)[VEC], int64_t base, int64_t C, int64_t y,
                                           bool live, A fill, const RowStats<A>& r, A coef,
                                           const TT* __restrict__ probs_row,
                                           const A* __restrict__ w, A c1, A b, A (&g)[VEC]) {
  A t[VEC];
  if (DENSE && probs_row != nullptr) load_targets<TT, A, VEC>(probs_row, base, C, t);
  const int ky = y >= base && y < base + VEC ? static_cast<int>(y - base) : -1;
  const A inv_s = A(1) / r.s;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    if (!live) {
      g[k] = fill;
    } else if (DENSE ? base + k == y : k == ky) {
      g[k] = r.g_y * coef;
    } else {
      const A p_k = ck_exp(v[k] - r.m) * inv_s;
      if constexpr (DENSE) {
        const A w_k = w != nullptr && base + k < C ? w[base + k] : A(1);
        const A a_k = (probs_row != nullptr ? c1 * t[k] + b : b) * w_k;
        const A G_k = r.gamma == A(0) ? A(1) : focal_terms((v[k] - r.m) - r.log_s, r.gamma).G;
        g[k] = (p_k * r.S - a_k * G_k) * coef;
      } else {
        g[k] = p_k * r.S * coef;
      }
    }
  }
}

template <typename T, typename TT, bool DENSE, int TPR>
__global__ void __launch_bounds__(TPR < 256 ? 256 : TPR)
    focal_loss_forward_kernel(const FocalLossLaunch p) {
  using A = typename MathType<T>::type;
  constexpr int VEC = 16 / sizeof(T);
  constexpr int ROWS = (TPR < 256 ? 256 : TPR) / TPR;
  __shared__ SoftmaxState<A> smem_state[32];
  __shared__ A smem_sum[32];
  __shared__ double smem_loss[ROWS > 32 ? ROWS : 32];

  const T* __restrict__ logits = static_cast<const T*>(p.logits);
  const TT* __restrict__ probs = DENSE ? static_cast<const TT*>(p.probs) : nullptr;
  const A* __restrict__ w = static_cast<const A*>(p.weight);
  T* __restrict__ grad = static_cast<T*>(p.grad);
  A* __restrict__ stats = static_cast<A*>(p.stats);
  const int64_t C = p.n_classes;
  const int lane = threadIdx.x % TPR;
  const A eps = DENSE ? static_cast<A>(p.smoothing) : A(0);
  const A c1 = A(1) - eps, b = eps / static_cast<A>(C);
  const A scale_all =
      p.reduction == ReductionKind::Mean ? A(1) / static_cast<A>(mean_divisor(p)) : A(1);
  double block_loss = 0.0;  // thread 0: this block's rows, in order

  for (int64_t first = static_cast<int64_t>(blockIdx.x) * ROWS; first < p.n_rows;
       first += static_cast<int64_t>(gridDim.x) * ROWS) {
    // Subgroups past the last row still join every shuffle (uniform control flow).
    const int64_t r = first + threadIdx.x / TPR;
    const bool active = r < p.n_rows;
    const int64_t row_i = active ? r : 0;
    const T* __restrict__ row = logits + row_i * C;
    const TT* __restrict__ probs_row = probs != nullptr ? probs + row_i * C : nullptr;
    const int64_t y = p.target == nullptr ? -1 : active ? p.target[row_i] : p.ignore_index;
    const bool ignored = p.target != nullptr && y == p.ignore_index;
    const bool bad = p.target != nullptr && !ignored && (y < 0 || y >= C);  // never read it
    const bool live = active && !ignored && !bad;

    // Pass 1: softmax statistics; the first kItems chunks stay in registers, all loaded before
    // the first is used (their latencies overlap).
    A cache[kItems][VEC];
    SoftmaxState<A> st{-INFINITY, A(0), A(0)};
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t base = (static_cast<int64_t>(i) * TPR + lane) * VEC;
      if (active && base < C) load_chunk<T, VEC>(row, base, C, p.vectorized, cache[i]);
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t base = (static_cast<int64_t>(i) * TPR + lane) * VEC;
      if (active && base < C) update_state(st, cache[i], base, C);
    }
    for (int64_t base = (static_cast<int64_t>(kItems) * TPR + lane) * VEC; active && base < C;
         base += static_cast<int64_t>(TPR) * VEC) {
      A v[VEC];
      load_chunk<T, VEC>(row, base, C, p.vectorized, v);
      update_state(st, v, base, C);
    }
    st = reduce_state<TPR>(st, smem_state);
    RowStats<A> rs;
    rs.m = st.m;
    rs.s = st.n_max + st.rest;
    rs.log_s = log_sum_exp_shifted(st.n_max, st.rest);
    rs.scale = live ? scale_all : A(0);

    // gamma: from the true class's probability, or sum_k t_k p_k for probability targets.
    const A lp_y = live && y >= 0 ? (to_math(row[y]) - rs.m) - rs.log_s : A(0);
    A p_sel = ck_exp(lp_y);
    if (DENSE && probs != nullptr && p.schedule.n > 0) {
      A part = 0;
      if (active) {
        for_each_chunk<T, TPR, VEC>(row, C, lane, p.vectorized, cache,
                                    [&](int64_t base, const A(&v)[VEC]) {
          A t[VEC];
          load_targets<TT, A, VEC>(probs_row, base, C, t);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            if (base + k < C) part += t[k] * ck_exp(v[k] - rs.m);
          }
        });
      }
      p_sel = reduce_sum<TPR>(part, smem_sum) / rs.s;
    }
    rs.gamma = launch_gamma(p, p_sel);
    const FocalTerms<A> ty = focal_terms(lp_y, ck_exp(lp_y), rs.gamma);
    const A w_y = live && y >= 0 && w ? w[y] : A(1);
    const bool index = y >= 0;
    A loss = index ? c1 * w_y * ty.f : A(0);  // the one-hot part of the true class
    A aG_y = index ? c1 * w_y * ty.G : A(0);
    A S_other = 0;

    // Pass 2 (a dense target distribution): sum_k a_k f_k and sum_{k != y} a_k G_k.
    if constexpr (DENSE) {
      A sum_af = 0, sum_aG = 0;
      if (live) {
        for_each_chunk<T, TPR, VEC>(row, C, lane, p.vectorized, cache,
                                    [&](int64_t base, const A(&v)[VEC]) {
          A t[VEC];
          if (probs_row != nullptr) load_targets<TT, A, VEC>(probs_row, base, C, t);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const int64_t idx = base + k;
            if (idx < C) {
              const A a_k = (probs_row != nullptr ? c1 * t[k] + b : b) * (w ? w[idx] : A(1));
              const FocalTerms<A> tk = focal_terms((v[k] - rs.m) - rs.log_s, rs.gamma);
              sum_af += a_k * tk.f;
              if (idx != y) sum_aG += a_k * tk.G;
            }
          }
        });
      }
      loss += reduce_sum<TPR>(sum_af, smem_sum);
      S_other = reduce_sum<TPR>(sum_aG, smem_sum);
      if (index) aG_y += b * w_y * ty.G;
    }
    const bool poisoned = poisoned_max(rs.m);  // as torch: x - max is inf - inf
    rs.S = poisoned ? A(NAN) : S_other + aG_y;
    rs.g_y = poisoned ? A(NAN) : true_class_grad(ty, S_other, aG_y);
    const A row_loss = !active || ignored ? A(0) : (bad || poisoned ? A(NAN) : -loss);
    if (lane == 0) {
      if (active && p.reduction == ReductionKind::None) store_value(p.loss, row_i, p.out_dtype, row_loss);
      smem_loss[threadIdx.x / TPR] = active ? static_cast<double>(row_loss) : 0.0;
      if (active && stats != nullptr) {
        A* o = stats + row_i * kRowStats;
        o[0] = rs.m; o[1] = rs.s; o[2] = rs.log_s; o[3] = rs.gamma; o[4] = rs.S; o[5] = rs.g_y;
        o[6] = rs.scale;
      }
    }

    // Pass 3: the gradient for grad_output = 1, written once.
    if (grad != nullptr && active) {
      T* __restrict__ grow = grad + row_i * C;
      const A fill = bad ? A(NAN) : A(0);
      for_each_chunk<T, TPR, VEC>(row, C, lane, p.vectorized, cache,
                                  [&](int64_t base, const A(&v)[VEC]) {
        A g[VEC];
        grad_chunk<DENSE>(v, base, C, y, live, fill, rs, rs.scale, probs_row, w, c1, b, g);
        store_chunk<T, VEC>(grow, base, C, p.vectorized, g);
      });
    }
    if (p.reduction != ReductionKind::None) {
      __syncthreads();
      if (threadIdx.x == 0) {
        for (int j = 0; j < ROWS; ++j) block_loss += smem_loss[j];
      }
      __syncthreads();
    }
  }
  if (p.reduction == ReductionKind::None) return;

  finish_reduced_loss(p, block_loss);
}

// The gradient phase: grad = grad_output x d loss / d input from the input and the RowStats.
template <typename T, typename TT, bool DENSE, int TPR>
__global__ void __launch_bounds__(TPR < 256 ? 256 : TPR)
    focal_loss_backward_kernel(const FocalLossLaunch p) {
  using A = typename MathType<T>::type;
  constexpr int VEC = 16 / sizeof(T);
  constexpr int ROWS = (TPR < 256 ? 256 : TPR) / TPR;
  const T* __restrict__ logits = static_cast<const T*>(p.logits);
  const TT* __restrict__ probs = DENSE ? static_cast<const TT*>(p.probs) : nullptr;
  const A* __restrict__ w = static_cast<const A*>(p.weight);
  const A* __restrict__ stats = static_cast<const A*>(p.stats);
  T* __restrict__ grad = static_cast<T*>(p.grad);
  const int64_t C = p.n_classes;
  const int lane = threadIdx.x % TPR;
  const A eps = DENSE ? static_cast<A>(p.smoothing) : A(0);
  const A c1 = A(1) - eps, b = eps / static_cast<A>(C);
  const bool per_row = p.reduction == ReductionKind::None;
  // A scalar grad_output of 1 over a stored gradient: every block exits at once.
  if (p.skip_one && !per_row && load_value<A>(p.grad_output, 0, p.go_dtype) == A(1)) return;

  for (int64_t first = static_cast<int64_t>(blockIdx.x) * ROWS; first < p.n_rows;
       first += static_cast<int64_t>(gridDim.x) * ROWS) {
    const int64_t row_i = first + threadIdx.x / TPR;
    if (row_i >= p.n_rows) continue;  // no shuffles below: subgroups may leave
    const A go_i = load_value<A>(p.grad_output, per_row ? row_i * p.go_stride : 0, p.go_dtype);
    if (p.skip_one && go_i == A(1)) continue;
    const T* __restrict__ row = logits + row_i * C;
    const TT* __restrict__ probs_row = probs != nullptr ? probs + row_i * C : nullptr;
    const int64_t y = p.target == nullptr ? -1 : p.target[row_i];
    const bool ignored = p.target != nullptr && y == p.ignore_index;
    const bool bad = p.target != nullptr && !ignored && (y < 0 || y >= C);
    const A* o = stats + row_i * kRowStats;
    const RowStats<A> rs{o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
    const A fill = bad ? A(NAN) : A(0);
    T* __restrict__ grow = grad + row_i * C;
    for (int64_t base = static_cast<int64_t>(lane) * VEC; base < C;
         base += static_cast<int64_t>(TPR) * VEC) {
      A v[VEC], g[VEC];
      load_chunk<T, VEC>(row, base, C, p.vectorized, v);
      grad_chunk<DENSE>(v, base, C, y, !ignored && !bad, fill, rs, go_i * rs.scale, probs_row,
                        w, c1, b, g);
      store_chunk<T, VEC>(grow, base, C, p.vectorized, g);
    }
  }
}

template <int TPR>
unsigned row_grid(const FocalLossLaunch& p) {
  constexpr int threads = TPR < 256 ? 256 : TPR;
  constexpr int rows_per_block = threads / TPR;
  const int64_t blocks = (p.n_rows + rows_per_block - 1) / rows_per_block;
  return static_cast<unsigned>(blocks < INT_MAX ? (blocks > 0 ? blocks : 1) : INT_MAX);
}

// Rows per subgroup by row length: the logits a thread keeps on chip cover the row up to 512
// threads (32 KB of logits a CTA), then the rest streams. Not 1024: its 64-register cap spilled
// 156-424 bytes a thread in the forward passes; 512 threads leave 128 registers.
template <typename T, typename F>
cudaError_t by_row_length(const FocalLossLaunch& p, F&& launch) {
  constexpr int64_t vec = 16 / sizeof(T), per_thread = vec * kItems;
  // short rows: a chunk a thread, several rows a warp
  if (p.n_classes <= 4 * vec) return launch(std::integral_constant<int, 4>{});
  if (p.n_classes <= 8 * vec) return launch(std::integral_constant<int, 8>{});
  if (p.n_classes <= 16 * vec) return launch(std::integral_constant<int, 16>{});
  if (p.n_classes <= 32 * per_thread) return launch(std::integral_constant<int, 32>{});
  if (p.n_classes <= 256 * per_thread) return launch(std::integral_constant<int, 256>{});
  return launch(std::integral_constant<int, 512>{});
}

// Calls launch(TT{}, dense) for inputs of storage type T: TT the storage type of probability
// targets (the input's, or the math type; the math type for class indices, where it is unused),
// dense a std::bool_constant (a target over every class: probabilities or label smoothing).
template <typename T, typename F>
void dispatch_target(const FocalLossLaunch& p, F&& launch) {
  using A = typename MathType<T>::type;
  if (p.probs == nullptr && !(p.smoothing > 0.0)) return launch(A{}, std::false_type{});
  if constexpr (!std::is_same_v<T, A>) {
    if (p.probs != nullptr && p.target_dtype == p.dtype) return launch(T{}, std::true_type{});
  }
  launch(A{}, std::true_type{});
}

}  // namespace general

// The general row kernels for inputs of storage type T, enqueued on `stream` (errors are left for
// the caller's cudaGetLastError): the forward, or the gradient phase. Instantiated once a dtype,
// in focal_loss_kernels_<dtype>.cu.
template <typename T>
void launch_focal_loss_rows(const FocalLossLaunch& p, bool forward, cudaStream_t stream) {
  using namespace general;
  dispatch_target<T>(p, [&](auto tt_tag, auto dense) {
    by_row_length<T>(p, [&](auto tpr) {
      using TT = decltype(tt_tag);
      constexpr bool DENSE = decltype(dense)::value;
      constexpr int TPR = decltype(tpr)::value;
      auto kernel = forward ? focal_loss_forward_kernel<T, TT, DENSE, TPR>
                            : focal_loss_backward_kernel<T, TT, DENSE, TPR>;
      kernel<<<row_grid<TPR>(p), TPR < 256 ? 256 : TPR, 0, stream>>>(p);
      return cudaSuccess;
    });
  });
}

#define CK_FOCAL_LOSS_ROWS(EXTERN, T) \
  EXTERN template void launch_focal_loss_rows<T>(const FocalLossLaunch&, bool, cudaStream_t);
// Compiled in their own files only (nvcc builds the four in parallel).
CK_FOCAL_LOSS_ROWS(extern, float)
CK_FOCAL_LOSS_ROWS(extern, double)
CK_FOCAL_LOSS_ROWS(extern, __half)
CK_FOCAL_LOSS_ROWS(extern, __nv_bfloat16)

}  // namespace calibkernels
