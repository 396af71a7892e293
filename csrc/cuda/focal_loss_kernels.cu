// Fused focal loss on CUDA (CONTRACT §1): one subgroup of TPR threads per row. A row is read once
// into registers when it fits (16-byte loads), its softmax statistics reduced across the subgroup,
// and its gradient written once; longer rows stream with an online softmax and re-read only the
// part that did not fit. No torch headers, no host synchronisation, deterministic reductions.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>

#include "cuda_utils.cuh"
#include "focal_loss_launch.h"

namespace calibkernels {
namespace {

constexpr int kItems = 4;           // 16-byte chunks per thread kept in registers
constexpr int kReduceThreads = 1024;  // the single-block reductions over N

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

// Loads the VEC logits at [base, base + VEC) of a row; those past the row's end are not used.
template <typename T, int VEC>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int64_t base, int64_t C,
                                           bool vectorized,
                                           typename MathType<T>::type (&v)[VEC]) {
  using A = typename MathType<T>::type;
  if (vectorized) {  // then C % VEC == 0: a chunk that starts in the row ends in it
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(row + base);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = to_math(pk.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = base + k < C ? to_math(row[base + k]) : A(0);
  }
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
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    if (base + k < C) {
      if (v[k] == s.m) s.n_max += A(1);
      else s.rest += ck_exp(v[k] - s.m);
    }
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

template <typename T, int TPR>
__global__ void __launch_bounds__(TPR < 256 ? 256 : TPR)
    focal_loss_rows_kernel(const FocalLossLaunch p) {
  using A = typename MathType<T>::type;
  constexpr int VEC = 16 / sizeof(T);
  constexpr int ROWS = (TPR < 256 ? 256 : TPR) / TPR;
  __shared__ SoftmaxState<A> smem_state[32];
  __shared__ A smem_sum[32];

  const T* __restrict__ logits = static_cast<const T*>(p.logits);
  const A* __restrict__ w = static_cast<const A*>(p.weight);
  T* __restrict__ grad = static_cast<T*>(p.grad);
  A* __restrict__ loss_rows = static_cast<A*>(p.loss_rows);
  const int64_t C = p.n_classes;
  const int lane = threadIdx.x % TPR;
  const A eps = static_cast<A>(p.smoothing);
  const A b = eps / static_cast<A>(C);  // smoothed target mass of every class
  const A scale = p.reduction == ReductionKind::Mean ? A(1) / static_cast<A>(*p.divisor) : A(1);

  for (int64_t first = static_cast<int64_t>(blockIdx.x) * ROWS; first < p.n_rows;
       first += static_cast<int64_t>(gridDim.x) * ROWS) {
    // Subgroups past the last row still join every shuffle (uniform control flow).
    const int64_t r = first + threadIdx.x / TPR;
    const bool active = r < p.n_rows;
    const int64_t row_i = active ? r : 0;
    const T* __restrict__ row = logits + row_i * C;
    const int64_t y = active ? p.target[row_i] : p.ignore_index;
    const bool ignored = y == p.ignore_index;
    const bool bad = !ignored && (y < 0 || y >= C);  // never read or write out of bounds for it
    const bool live = active && !ignored && !bad;

    // Pass 1: softmax statistics; the first kItems chunks stay in registers.
    A cache[kItems][VEC];
    SoftmaxState<A> st{-INFINITY, A(0), A(0)};
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t base = (static_cast<int64_t>(i) * TPR + lane) * VEC;
      if (active && base < C) {
        load_chunk<T, VEC>(row, base, C, p.vectorized, cache[i]);
        update_state(st, cache[i], base, C);
      }
    }
    for (int64_t base = (static_cast<int64_t>(kItems) * TPR + lane) * VEC; active && base < C;
         base += static_cast<int64_t>(TPR) * VEC) {
      A v[VEC];
      load_chunk<T, VEC>(row, base, C, p.vectorized, v);
      update_state(st, v, base, C);
    }
    st = reduce_state<TPR>(st, smem_state);
    const A m = st.m, s = st.n_max + st.rest;
    const A log_s = log_sum_exp_shifted(st.n_max, st.rest);

    // The true class: its gamma (from p_y, no gradient through the choice) and focal terms.
    const A lp_y = live ? (to_math(row[y]) - m) - log_s : A(0);
    const A p_y = ck_exp(lp_y);
    const A gamma = select_gamma(p.schedule, p_y);
    const FocalTerms<A> ty = focal_terms(lp_y, p_y, gamma);
    const A w_y = live && w ? w[y] : A(1);
    const A a1_y = (A(1) - eps) * w_y;  // the one-hot part of a_y; smoothing adds b w_y
    A loss = a1_y * ty.f;
    A S_other = 0;
    A aG_y = a1_y * ty.G;

    // Pass 2 (label smoothing only): sum_k a_k f_k and sum_{k != y} a_k G_k.
    if (eps > A(0)) {
      A sum_af = 0, sum_aG = 0;
      if (live) {
        for_each_chunk<T, TPR, VEC>(row, C, lane, p.vectorized, cache,
                                    [&](int64_t base, const A(&v)[VEC]) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const int64_t idx = base + k;
            if (idx < C) {
              const A a_k = b * (w ? w[idx] : A(1));
              const FocalTerms<A> t = focal_terms((v[k] - m) - log_s, gamma);
              sum_af += a_k * t.f;
              if (idx != y) sum_aG += a_k * t.G;
            }
          }
        });
      }
      loss += reduce_sum<TPR>(sum_af, smem_sum);
      S_other = reduce_sum<TPR>(sum_aG, smem_sum);
      aG_y += b * w_y * ty.G;
    }

    if (active && lane == 0) loss_rows[row_i] = bad ? A(NAN) : (live ? -loss : A(0));

    // Pass 3: the gradient, written once.
    if (grad != nullptr && active) {
      T* __restrict__ grow = grad + row_i * C;
      const A S = S_other + aG_y, inv_s = A(1) / s;
      const A g_y = true_class_grad(ty, S_other, aG_y) * scale;
      const A fill = bad ? A(NAN) : A(0);
      for_each_chunk<T, TPR, VEC>(row, C, lane, p.vectorized, cache,
                                  [&](int64_t base, const A(&v)[VEC]) {
        A g[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const int64_t idx = base + k;
          if (!live) {
            g[k] = fill;
          } else if (idx == y) {
            g[k] = g_y;
          } else {
            const A lp = (v[k] - m) - log_s;
            const A p_k = ck_exp(v[k] - m) * inv_s;
            if (eps > A(0)) {
              const A a_k = b * (w && idx < C ? w[idx] : A(1));
              g[k] = (p_k * S - a_k * focal_terms(lp, gamma).G) * scale;
            } else {
              g[k] = p_k * aG_y * scale;
            }
          }
        }
        store_chunk<T, VEC>(grow, base, C, p.vectorized, g);
      });
    }
  }
}

// The mean's divisor: the sum of w_y over non-ignored samples (NaN if a target is out of range:
// the loss and gradient are then NaN, never silently wrong). One block, fixed order: deterministic.
template <typename A>
__global__ void __launch_bounds__(kReduceThreads)
    focal_loss_divisor_kernel(const int64_t* __restrict__ target, const A* __restrict__ weight,
                              int64_t N, int64_t C, int64_t ignore_index,
                              double* __restrict__ divisor) {
  __shared__ double smem[kReduceThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < N; i += kReduceThreads) {
    const int64_t y = target[i];
    if (y == ignore_index) continue;
    acc += (y < 0 || y >= C) ? NAN : (weight ? static_cast<double>(weight[y]) : 1.0);
  }
  smem[threadIdx.x] = acc;
  __syncthreads();
  for (int half = kReduceThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) smem[threadIdx.x] += smem[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) *divisor = smem[0];
}

// The reduced loss: sum of the per-row losses in double, in a fixed order, / divisor for "mean".
template <typename A>
__global__ void __launch_bounds__(kReduceThreads)
    focal_loss_reduce_kernel(const A* __restrict__ loss_rows, int64_t N,
                             const double* __restrict__ divisor, bool mean,
                             A* __restrict__ out) {
  __shared__ double smem[kReduceThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < N; i += kReduceThreads) acc += loss_rows[i];
  smem[threadIdx.x] = acc;
  __syncthreads();
  for (int half = kReduceThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) smem[threadIdx.x] += smem[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = static_cast<A>(mean ? smem[0] / *divisor : smem[0]);
}

template <typename T, int TPR>
void launch_rows(const FocalLossLaunch& p, cudaStream_t stream) {
  constexpr int threads = TPR < 256 ? 256 : TPR;
  constexpr int rows_per_block = threads / TPR;
  const int64_t blocks = (p.n_rows + rows_per_block - 1) / rows_per_block;
  const unsigned grid = static_cast<unsigned>(blocks < INT_MAX ? blocks : INT_MAX);
  focal_loss_rows_kernel<T, TPR><<<grid, threads, 0, stream>>>(p);
}

template <typename T>
cudaError_t launch_typed(const FocalLossLaunch& p, cudaStream_t stream) {
  using A = typename MathType<T>::type;
  constexpr int64_t per_thread = (16 / sizeof(T)) * kItems;  // logits a thread keeps on chip
  focal_loss_divisor_kernel<A><<<1, kReduceThreads, 0, stream>>>(
      p.target, static_cast<const A*>(p.weight), p.n_rows, p.n_classes, p.ignore_index,
      p.divisor);
  if (p.n_rows > 0) {
    if (p.n_classes <= 32 * per_thread) launch_rows<T, 32>(p, stream);
    else if (p.n_classes <= 256 * per_thread) launch_rows<T, 256>(p, stream);
    else launch_rows<T, 1024>(p, stream);
  }
  if (p.reduction != ReductionKind::None) {
    focal_loss_reduce_kernel<A><<<1, kReduceThreads, 0, stream>>>(
        static_cast<const A*>(p.loss_rows), p.n_rows, p.divisor,
        p.reduction == ReductionKind::Mean, static_cast<A*>(p.loss));
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_focal_loss(const FocalLossLaunch& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype,
                        [&](auto tag) { return launch_typed<decltype(tag)>(p, stream); });
}

}  // namespace calibkernels
