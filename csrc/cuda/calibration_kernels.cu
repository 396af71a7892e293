// Fused calibration state on CUDA (CONTRACT §2). The rows are read once: each row's prediction
// and both readings of it (softmax: confidence 1 / s, Brier, NLL; probabilities: the top value,
// Brier, NLL), from sums that leave out the true class so that nothing cancels as p_y -> 1, and
// whether its values lie in [0, 1]. Rows up to 64 KB are held in registers (row_layout.cuh:
// several rows a warp or block, every load issued before the first use), longer ones streamed a
// warp a row. One more launch bins the samples in chunks of rows and the last chunk to finish
// sums the chunks in order, keeps the reading that holds and writes ECE, MCE and RMSCE: integer
// counts, float64 sums in a fixed order, no float atomics, so every run gives the same bits.
// Never a host sync; a target out of range turns its sample NaN instead of reading astray.
#include <cuda_runtime.h>

#include <climits>
#include <type_traits>

#include "../calibration_row.h"
#include "calibration_launch.h"
#include "cuda_utils.cuh"
#include "row_layout.cuh"

namespace calibkernels {
namespace {

constexpr int kRowWarps = 8;  // rows (warps) per block of the streaming row kernels
constexpr int kTopThreads = 256;

// A lane's view of a row: max, first index of it, sums over k != y of exp(x_k - max) and its
// square, of x_k^2, and whether a value fell outside [0, 1].
template <typename A>
struct RowState {
  A m, other, other2, sq;
  int64_t idx;
  bool outside;
};

template <typename A>
__device__ __forceinline__ A rescale(A sum, A from, A to) {
  return sum == A(0) ? A(0) : sum * ck_exp(from - to);
}

template <typename A>
__device__ __forceinline__ RowState<A> merge(const RowState<A>& a, const RowState<A>& b) {
  RowState<A> o;
  o.m = a.m > b.m ? a.m : b.m;
  if (a.m == b.m) o.idx = a.idx < b.idx ? a.idx : b.idx;  // torch.argmax: the lowest index
  else o.idx = a.m > b.m ? a.idx : b.idx;
  o.other = rescale(a.other, a.m, o.m) + rescale(b.other, b.m, o.m);
  o.other2 = rescale(a.other2, A(2) * a.m, A(2) * o.m) + rescale(b.other2, A(2) * b.m, A(2) * o.m);
  o.sq = a.sq + b.sq;
  o.outside = a.outside || b.outside;
  return o;
}

// A row's finish, by one thread: its samples columns, prediction and rule flag.
template <typename A>
__device__ __forceinline__ void write_sample(const CalibrationLaunch& p, int64_t r, A m, A other,
                                             A other2, A sq, bool outside, int64_t idx, A x_y) {
  const int64_t y = p.target[r];
  const bool kept = y != p.ignore_index;
  const bool bad = kept && (y < 0 || y >= p.n_classes);
  const A z_y = x_y - m;
  const A s = other + ck_exp(z_y);
  const A q = A(1) - x_y;
  A* o = static_cast<A*>(p.samples) + r * kSampleColumns;
  const bool poison_p = bad || outside;  // a value outside [0, 1]: not probabilities
  o[kConfL] = bad ? A(NAN) : A(1) / s;
  o[kBrierL] = bad ? A(NAN) : (other2 + other * other) / (s * s);
  o[kNllL] = bad ? A(NAN) : (z_y == A(0) ? ck_log1p(other) : ck_log(s) - z_y);
  o[kConfP] = poison_p ? A(NAN) : m;
  o[kBrierP] = poison_p ? A(NAN) : sq + q * q;
  o[kNllP] = poison_p ? A(NAN) : -ck_log(x_y);
  o[kRowMax] = m;
  o[kRowSum] = bad ? A(NAN) : s;
  p.correct[r] = idx == y;  // a NaN confidence voids it where the reading is known
  p.inside[r] = !kept || !outside;
}

// ---- rows up to 64 KB: the row in registers ----

// A thread's sums over its part of a row: exp(x - max) and its square and x^2 over k != y, the
// first index of the max (INT_MAX: none) and the smallest value (with the max: the [0, 1] test).
struct RowSums {
  float other, other2, sq;
  int idx;
  float lo;
};

__device__ __forceinline__ RowSums shfl_xor(const RowSums& v, int off) {
  return {calibkernels::shfl_xor(v.other, off), calibkernels::shfl_xor(v.other2, off),
          calibkernels::shfl_xor(v.sq, off), calibkernels::shfl_xor(v.idx, off),
          calibkernels::shfl_xor(v.lo, off)};
}

struct MaxOf {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }  // NaN-blind
};
struct AddSums {
  __device__ RowSums operator()(const RowSums& a, const RowSums& b) const {
    return {a.other + b.other, a.other2 + b.other2, a.sq + b.sq, a.idx < b.idx ? a.idx : b.idx,
            fminf(a.lo, b.lo)};
  }
};

// TPR threads a row, ITEMS 16-byte chunks a thread (register_row_layout), 16- and 32-bit types:
// all the row's loads, then its max (and min), then one pass for the sums and the first index of
// the max: an exp2 and a few adds an element, no branch. A NaN anywhere makes the sums NaN.
template <typename T, int TPR, int ITEMS, bool ALIGNED>
__global__ void __launch_bounds__(threads_of(TPR), 2048 / threads_of(TPR) / 2)
    calibration_rows_kernel(const CalibrationLaunch p) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int THREADS = threads_of(TPR), ROWS = THREADS / TPR;
  using Chunk = Pack<T, VEC>;
  __shared__ float smem_max[THREADS / 32];
  __shared__ RowSums smem_sums[THREADS / 32];
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.ticket = 0u;  // for the top kernel, next in stream
  const int C = static_cast<int>(p.n_classes);  // <= 4096 chunks here: 32-bit offsets
  const int lane = threadIdx.x % TPR, group = threadIdx.x / TPR;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * ROWS; first < p.n_rows;
       first += static_cast<int64_t>(gridDim.x) * ROWS) {
    // Threads past the last row still join every shuffle and barrier (uniform control flow).
    const int64_t r = first + group;
    const bool active = r < p.n_rows;
    const int64_t row_i = active ? r : 0;
    const int64_t y64 = p.target[row_i];
    const bool holds = y64 != p.ignore_index && y64 >= 0 && y64 < C;
    const int y = holds ? static_cast<int>(y64) : 0;  // never read out of bounds
    const T* __restrict__ row = static_cast<const T*>(p.input) + row_i * p.n_classes;
    // Element k of chunk i is column lane VEC + i TPR VEC + k: offsets from one register, the
    // rest immediates (no per-element index kept alive across the passes).
    const int rem = active ? C - lane * VEC : 0;  // in the row: offset < rem
    const int y_rel = y - lane * VEC;
    Chunk x[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const T* at = row + lane * VEC + i * TPR * VEC;
      if constexpr (ALIGNED) {
        if (i * TPR * VEC < rem) x[i] = *reinterpret_cast<const Chunk*>(at);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          if (i * TPR * VEC + k < rem) x[i].v[k] = at[k];
        }
      }
    }
    const float x_y = active && lane == 0 ? to_math(row[y]) : 0.0f;

    float m = -INFINITY, lo = INFINITY;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if constexpr (ALIGNED) {
        if (i * TPR * VEC < rem) {
          m = fmaxf(m, chunk_max(x[i]));
          lo = fminf(lo, chunk_min(x[i]));
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          if (i * TPR * VEC + k < rem) {
            m = fmaxf(m, to_math(x[i].v[k]));
            lo = fminf(lo, to_math(x[i].v[k]));
          }
        }
      }
      keep_packed(x[i]);
    }
    m = row_reduce<TPR>(m, smem_max, MaxOf{});

    constexpr int kNone = ITEMS * VEC;
    int at_max = kNone;  // this thread's first element equal to the max, as i VEC + k
    RowSums st{0.0f, 0.0f, 0.0f, INT_MAX, lo};
#pragma unroll
    for (int i = ITEMS - 1; i >= 0; --i) {  // backwards: the first element equal to m stays
#pragma unroll
      for (int k = VEC - 1; k >= 0; --k) {
        if ((ALIGNED ? i * TPR * VEC : i * TPR * VEC + k) < rem) {
          const float v = to_math(x[i].v[k]);
          const bool is_y = i * TPR * VEC + k == y_rel;
          at_max = v == m ? i * VEC + k : at_max;
          const float e = is_y ? 0.0f : exp2_ftz((v - m) * kLog2e);
          st.other += e;
          st.other2 += e * e;
          st.sq += is_y ? 0.0f : v * v;
        }
      }
      keep_packed(x[i]);
    }
    if (at_max != kNone) st.idx = lane * VEC + at_max / VEC * TPR * VEC + at_max % VEC;
    st = row_reduce<TPR, 1>(st, smem_sums, AddSums{});
    if (active && lane == 0) {
      // outside [0, 1]: the min, the max, or a NaN (which the sums and x_y carry)
      const bool outside = !(st.lo >= 0.0f && m <= 1.0f) || st.sq != st.sq || x_y != x_y;
      write_sample(p, row_i, m, st.other, st.other2, st.sq, outside,
                   st.idx == INT_MAX ? p.n_classes : static_cast<int64_t>(st.idx), x_y);
    }
  }
}

// ---- longer rows: a warp a row, streamed (online max and sums) ----

template <typename T>
__global__ void __launch_bounds__(32 * kRowWarps)
    calibration_rows_stream_kernel(const CalibrationLaunch p) {
  using A = typename MathType<T>::type;
  constexpr int VEC = 16 / sizeof(T);
  const T* __restrict__ input = static_cast<const T*>(p.input);
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.ticket = 0u;  // for the top kernel, next in stream
  const int lane = threadIdx.x % 32;
  const int64_t C = p.n_classes;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
       r < p.n_rows; r += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const T* __restrict__ row = input + r * C;
    const int64_t y = p.target[r];
    const bool holds = y != p.ignore_index && y >= 0 && y < C;
    const int64_t y_safe = holds ? y : 0;  // never read out of bounds for a bad target
    RowState<A> st{-INFINITY, A(0), A(0), A(0), C, false};
    for (int64_t base = static_cast<int64_t>(lane) * VEC; base < C; base += 32 * VEC) {
      A v[VEC];
      load_chunk<T, VEC>(row, base, C, p.vectorized, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int64_t c = base + k;
        if (c >= C) continue;
        st.outside |= !(v[k] >= A(0) && v[k] <= A(1));
        if (v[k] > st.m) {
          st.other = rescale(st.other, st.m, v[k]);
          st.other2 = rescale(st.other2, A(2) * st.m, A(2) * v[k]);
          st.m = v[k];
          st.idx = c;
        }
        if (c != y_safe) {
          const A e = v[k] == -INFINITY ? A(0) : ck_exp(v[k] - st.m);
          st.other += e;
          st.other2 += e * e;
          st.sq += v[k] * v[k];
        }
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      RowState<A> o;
      o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
      o.other = __shfl_xor_sync(0xffffffffu, st.other, off);
      o.other2 = __shfl_xor_sync(0xffffffffu, st.other2, off);
      o.sq = __shfl_xor_sync(0xffffffffu, st.sq, off);
      o.idx = __shfl_xor_sync(0xffffffffu, st.idx, off);
      o.outside = __shfl_xor_sync(0xffffffffu, static_cast<int>(st.outside), off) != 0;
      st = merge(st, o);
    }
    if (lane == 0) {
      write_sample(p, r, st.m, st.other, st.other2, st.sq, st.outside, st.idx,
                   to_math(row[y_safe]));
    }
  }
}

// ---- the top-label state from the samples: one launch ----

// Block (chunk, reading) bins its kCalibTopRows samples under one reading (blockIdx.y: 0 logits,
// 1 probabilities with kAuto) into partial sums, each in a fixed order: thread (bin, segment) adds
// its segment's rows in row order, then the segments in order; Brier and NLL per thread, then a
// tree. The last block to finish sums the chunks in chunk order for the reading that holds and
// writes the state, the totals and the errors.
template <typename A>
__global__ void __launch_bounds__(kTopThreads) calibration_top_kernel(const CalibrationLaunch p) {
  __shared__ int bins[kCalibTopRows];  // -1: an ignored sample
  __shared__ A conf[kCalibTopRows];
  __shared__ bool hit[kCalibTopRows];
  __shared__ double seg_sum[kTopThreads];
  __shared__ int seg_count[kTopThreads], seg_hits[kTopThreads];
  __shared__ double tree[2][kTopThreads];
  __shared__ bool last_block;
  const int nb = p.n_bins, t = threadIdx.x;
  const bool from_logits = p.mode == 1 || (p.mode == -1 && blockIdx.y == 0);
  const int column = from_logits ? kConfL : kConfP;
  const int64_t chunks = gridDim.x, first = static_cast<int64_t>(blockIdx.x) * kCalibTopRows;
  const int rows = static_cast<int>(
      p.n_rows - first < kCalibTopRows ? (p.n_rows > first ? p.n_rows - first : 0)
                                       : kCalibTopRows);
  const A* __restrict__ samples = static_cast<const A*>(p.samples);
  double brier = 0.0, nll = 0.0;
  int inside = 1;
  for (int j = t; j < rows; j += kTopThreads) {
    const int64_t i = first + j;
    const A* s = samples + i * kSampleColumns;
    const bool kept = p.target[i] != p.ignore_index;
    conf[j] = s[column];
    bins[j] = kept ? bin_index(s[column], p.boundaries, nb) : -1;
    hit[j] = p.correct[i] && s[column] == s[column];  // a NaN confidence: never correct
    if (kept) {
      brier += static_cast<double>(s[column + 1]);
      nll += static_cast<double>(s[column + 2]);
    }
    inside &= p.inside[i] ? 1 : 0;
  }
  tree[0][t] = brier;
  tree[1][t] = nll;
  inside = __syncthreads_and(inside);  // (and the barrier before the tree and the bins)
  for (int half = kTopThreads / 2; half > 0; half /= 2) {
    if (t < half) {
      tree[0][t] += tree[0][t + half];
      tree[1][t] += tree[1][t + half];
    }
    __syncthreads();
  }
  const int64_t at = static_cast<int64_t>(blockIdx.y) * chunks + blockIdx.x;
  const int segs = nb < kTopThreads ? kTopThreads / nb : 1;
  const int seg_len = (kCalibTopRows + segs - 1) / segs;
  for (int slot = t; slot < nb * segs; slot += kTopThreads) {
    const int b = slot / segs, sg = slot % segs;
    const int end = rows < (sg + 1) * seg_len ? rows : (sg + 1) * seg_len;
    int count = 0, hits = 0;
    double sum = 0.0;
    for (int j = sg * seg_len; j < end; ++j) {
      if (bins[j] != b) continue;
      count += 1;
      hits += hit[j] ? 1 : 0;
      sum += static_cast<double>(conf[j]);
    }
    if (segs > 1) {
      seg_sum[slot] = sum;
      seg_count[slot] = count;
      seg_hits[slot] = hits;
    } else {
      p.part_counts[at * nb + b] = count;
      p.part_sums[at * nb + b] = sum;
      p.part_hits[at * nb + b] = hits;
    }
  }
  if (segs > 1) {
    __syncthreads();
    if (t < nb) {
      int count = 0, hits = 0;
      double sum = 0.0;
      for (int sg = 0; sg < segs; ++sg) {
        count += seg_count[t * segs + sg];
        hits += seg_hits[t * segs + sg];
        sum += seg_sum[t * segs + sg];
      }
      p.part_counts[at * nb + t] = count;
      p.part_sums[at * nb + t] = sum;
      p.part_hits[at * nb + t] = hits;
    }
  }
  if (t == 0) {
    p.part_totals[at * 2] = tree[0][0];
    p.part_totals[at * 2 + 1] = tree[1][0];
    if (blockIdx.y == 0) p.part_inside[blockIdx.x] = inside;
  }

  __threadfence();  // this block's partials before its ticket
  __syncthreads();
  if (t == 0) last_block = atomicAdd(p.ticket, 1u) == gridDim.x * gridDim.y - 1;
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  const volatile int64_t* part_counts = p.part_counts;  // written by other blocks: not from L1
  const volatile double* part_sums = p.part_sums;
  const volatile int64_t* part_hits = p.part_hits;
  const volatile double* part_totals = p.part_totals;
  const volatile int* part_inside = p.part_inside;
  int all_inside = 1;
  for (int64_t c = t; c < chunks; c += kTopThreads) all_inside &= part_inside[c] != 0 ? 1 : 0;
  all_inside = __syncthreads_and(all_inside);
  const bool probs = p.mode == -1 ? all_inside != 0 : p.mode == 0;
  const int64_t base = (p.mode == -1 && probs ? chunks : 0);  // the reading kept
  for (int b = t; b < nb; b += kTopThreads) {
    int64_t count = 0, hits = 0;
    double sum = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {
      count += part_counts[(base + c) * nb + b];
      sum += part_sums[(base + c) * nb + b];
      hits += part_hits[(base + c) * nb + b];
    }
    p.counts[b] = count;
    p.conf_sums[b] = sum;
    p.hits[b] = hits;
  }
  if (t < 2) {
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) total += part_totals[(base + c) * 2 + t];
    p.totals[t] = total;
  }
  __syncthreads();  // the state, before thread 0 reads it back
  if (t == 0) {
    p.totals[2] = probs ? 1.0 : 0.0;
    binned_errors(p.counts, p.conf_sums, p.hits, nb, p.totals + 3);
  }
}

// Sums partials[chunk][slot] over the chunks, in chunk order, for every slot.
template <typename I>
__global__ void calibration_reduce_kernel(const I* __restrict__ part_counts,
                                          const double* __restrict__ part_sums,
                                          const I* __restrict__ part_hits, int64_t chunks,
                                          int64_t slots, I* __restrict__ counts,
                                          double* __restrict__ sums, I* __restrict__ hits) {
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < slots;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    I count = 0, hit = 0;
    double sum = 0.0;
    for (int64_t g = 0; g < chunks; ++g) {
      if (part_counts != nullptr) count += part_counts[g * slots + s];
      sum += part_sums[g * slots + s];
      if (part_hits != nullptr) hit += part_hits[g * slots + s];
    }
    if (counts != nullptr) counts[s] = count;
    sums[s] = sum;
    if (hits != nullptr) hits[s] = hit;
  }
}

// Classwise sums: a thread per class (consecutive classes: coalesced reads), the rows of one
// chunk in order, 8 rows' loads issued before their first use. The thread's bins live in shared
// memory when they fit (SHARED), else in its own slice of the partials, which no other thread
// touches: any n_bins, still deterministic.
constexpr int kClasswiseBatch = 8;

template <typename T, bool SHARED>
__global__ void calibration_classwise_partials_kernel(CalibrationLaunch p, bool from_logits,
                                                      int64_t rows_per_chunk) {
  using A = typename MathType<T>::type;
  using Count = std::conditional_t<SHARED, int, int64_t>;
  const int nb = p.n_bins;
  // Classes stride by the grid's y extent (at most 65535 blocks): any number of classes.
  for (int64_t k = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
       k < p.n_classes; k += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const int64_t out = static_cast<int64_t>(blockIdx.x) * p.n_classes * nb + k * nb;
    double* sums;
    Count* counts;
    Count* hits;
    if constexpr (SHARED) {
      extern __shared__ unsigned char smem_raw[];
      double* smem_sums = reinterpret_cast<double*>(smem_raw);                // [blockDim][nb]
      int* smem_counts = reinterpret_cast<int*>(smem_sums + blockDim.x * nb);  // [2][blockDim][nb]
      sums = smem_sums + threadIdx.x * nb;
      counts = smem_counts + threadIdx.x * nb;
      hits = smem_counts + (blockDim.x + threadIdx.x) * nb;
    } else {
      sums = p.cw_part_sums + out;
      counts = p.cw_part_counts + out;
      hits = p.cw_part_hits + out;
    }
    for (int b = 0; b < nb; ++b) {
      sums[b] = 0.0;
      counts[b] = 0;
      hits[b] = 0;
    }
    const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_chunk;
    const int64_t last = first + rows_per_chunk < p.n_rows ? first + rows_per_chunk : p.n_rows;
    const T* __restrict__ input = static_cast<const T*>(p.input);
    const A* __restrict__ samples = static_cast<const A*>(p.samples);
    for (int64_t i0 = first; i0 < last; i0 += kClasswiseBatch) {
      int64_t y[kClasswiseBatch];
      A x[kClasswiseBatch], row_max[kClasswiseBatch], row_sum[kClasswiseBatch],
          conf_p[kClasswiseBatch];
#pragma unroll
      for (int u = 0; u < kClasswiseBatch; ++u) {  // every load before the first use
        const int64_t i = i0 + u < last ? i0 + u : last - 1;  // past the end: the last row again
        const A* s = samples + i * kSampleColumns;
        y[u] = i0 + u < last ? p.target[i] : p.ignore_index;
        x[u] = to_math(input[i * p.n_classes + k]);
        row_max[u] = s[kRowMax];
        row_sum[u] = s[kRowSum];
        conf_p[u] = s[kConfP];
      }
#pragma unroll
      for (int u = 0; u < kClasswiseBatch; ++u) {  // the rows in order
        if (y[u] == p.ignore_index) continue;
        A pk = x[u];
        if (from_logits) {
          pk = ck_exp(pk - row_max[u]) / row_sum[u];
        } else if (conf_p[u] != conf_p[u]) {
          pk = A(NAN);  // a poisoned row
        }
        const int b = bin_index(pk, p.boundaries, nb);
        counts[b] += 1;
        sums[b] += static_cast<double>(pk);
        hits[b] += y[u] == k ? 1 : 0;
      }
    }
    if constexpr (SHARED) {
      for (int b = 0; b < nb; ++b) {
        p.cw_part_counts[out + b] = counts[b];
        p.cw_part_sums[out + b] = sums[b];
        p.cw_part_hits[out + b] = hits[b];
      }
    }
  }
}

int classwise_threads(int n_bins) {
  const int per_thread = n_bins * (8 + 4 + 4);
  int threads = (48 * 1024 / per_thread) / 32 * 32;
  return threads > 128 ? 128 : (threads < 32 ? 32 : threads);
}

unsigned row_blocks(int64_t n_rows) {
  const int64_t blocks = (n_rows + kRowWarps - 1) / kRowWarps;
  return static_cast<unsigned>(blocks < 1048576 ? (blocks > 0 ? blocks : 1) : 1048576);
}

// ---- the temperature sweep: a warp per row, read once (CONTRACT §2) ----
// A chunk of kSweepChunk elements is loaded (every load issued before the first use) and staged
// in the warp's shared memory; the lanes then split as (element group g) x (temperature lane t):
// L = min(32, next pow2 of K) temperature lanes, each summing J <= 8 temperatures t + L·j over
// the chunk elements of its group, online in the row max as the Triton sweep is. The groups are
// merged by a fixed shuffle tree: the same bits every run.

constexpr int kSweepPerLane = 8;
constexpr int kSweepChunk = 32 * kSweepPerLane;

// (2 blocks an SM: ptxas otherwise caps the J = 8 kernel at 80 registers and spills)
template <typename T, int J>
__global__ void __launch_bounds__(32 * kRowWarps, 2) calibration_sweep_rows_kernel(SweepLaunch p) {
  using A = typename MathType<T>::type;
  constexpr int kUnroll = sizeof(A) == 8 ? 2 : 8;  // float64 (tests, not speed): fewer registers
  __shared__ A stage[kRowWarps][kSweepChunk];
  const T* __restrict__ logits = static_cast<const T*>(p.logits);
  A* __restrict__ conf = static_cast<A*>(p.conf);
  A* __restrict__ nll = static_cast<A*>(p.nll);
  const int lane = threadIdx.x % 32;
  A* const chunk = stage[threadIdx.x / 32];
  const int64_t C = p.n_classes;
  const int K = p.n_temps;
  int L = 1;
  while (L < K && L < 32) L *= 2;
  const int G = 32 / L, g = lane / L, t = lane % L;
  A inv_t[J];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int k = t + L * j;
    inv_t[j] = static_cast<A>(k < K ? 1.0 / p.temperatures[k] : 1.0);
  }
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
       r < p.n_rows; r += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const T* __restrict__ row = logits + r * C;
    const int64_t y = p.target[r];
    const bool kept = y != p.ignore_index && y >= 0 && y < C;
    const int64_t y_safe = kept ? y : 0;
    A m = -INFINITY;
    int64_t idx = C;
    A other[J];
#pragma unroll
    for (int j = 0; j < J; ++j) other[j] = A(0);
    for (int64_t base = 0; base < C; base += kSweepChunk) {
      A v[kSweepPerLane];
#pragma unroll
      for (int u = 0; u < kSweepPerLane; ++u) {
        const int64_t c = base + lane + 32 * u;
        v[u] = c < C ? to_math(row[c]) : A(-INFINITY);
      }
      A cm = -INFINITY;  // the chunk's max and its first index (NaN never wins, as in argmax)
      int64_t ci = C;
#pragma unroll
      for (int u = 0; u < kSweepPerLane; ++u) {
        if (v[u] > cm) {
          cm = v[u];
          ci = base + lane + 32 * u;
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) {
        const A om = __shfl_xor_sync(0xffffffffu, cm, off);
        const int64_t oi = __shfl_xor_sync(0xffffffffu, ci, off);
        if (om > cm || (om == cm && oi < ci)) {
          cm = om;
          ci = oi;
        }
      }
      if (cm > m) {  // warp-uniform: rescale the sums to the new max
#pragma unroll
        for (int j = 0; j < J; ++j) {
          other[j] = other[j] == A(0) ? A(0) : other[j] * ck_exp((m - cm) * inv_t[j]);
        }
        m = cm;
        idx = ci;
      }
#pragma unroll
      for (int u = 0; u < kSweepPerLane; ++u) {  // the true class drops out of the sums here
        chunk[lane + 32 * u] = base + lane + 32 * u == y_safe ? A(-INFINITY) : v[u];
      }
      __syncwarp();
      // while the max is -inf the chunk holds only -inf and NaN: 0 as the shift adds 0 or NaN
      const A shift = m == -INFINITY ? A(0) : m;
      A part[J];  // the chunk's sums apart: a long row is not one running sum
#pragma unroll
      for (int j = 0; j < J; ++j) part[j] = A(0);
#pragma unroll kUnroll
      for (int e = g; e < kSweepChunk; e += G) {
        const A x = chunk[e];
#pragma unroll
        for (int j = 0; j < J; ++j) part[j] += ck_exp((x - shift) * inv_t[j]);
      }
#pragma unroll
      for (int j = 0; j < J; ++j) other[j] += part[j];
      __syncwarp();  // the chunk is read before the next one overwrites it
    }
#pragma unroll
    for (int j = 0; j < J; ++j) {
      for (int off = L; off < 32; off *= 2) other[j] += __shfl_xor_sync(0xffffffffu, other[j], off);
    }
    const A z_y_raw = to_math(row[y_safe]) - m;
    // a target out of range: NaN in both (its NLL read column 0 and would be wrong, silently)
    const bool valid = kept || y == p.ignore_index;
    if (g == 0) {
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int k = t + L * j;
        if (k >= K) break;
        const A z_y = z_y_raw * inv_t[j];
        const A s = other[j] + ck_exp(z_y);
        conf[r * K + k] = valid ? A(1) / s : A(NAN);
        nll[r * K + k] = !valid ? A(NAN) : z_y == A(0) ? ck_log1p(other[j]) : ck_log(s) - z_y;
      }
    }
    if (lane == 0) p.correct[r] = kept && idx == y;
  }
}

// The bins and NLL sum of one chunk of rows (blockIdx.x) at 32 temperatures, a lane each
// (blockIdx.y): a row's 32 temperatures are one coalesced read. Warp w sums its quarter of the
// chunk's rows in order, 8 rows' loads issued before their first use, into its own shared-memory
// bins (a tile of at most kSweepBinTile bins a pass, blockIdx.z); the quarters are then added in
// warp order: the same bits every run.
constexpr int kSweepPartWarps = 4;
constexpr int kSweepPartBatch = 8;
constexpr int kSweepBinTile = 20;  // 4 warps x 20 bins x 32 lanes x 16 B: 40 KB of shared memory
constexpr int64_t kSweepPartSlice = kCalibRowsPerChunk / kSweepPartWarps;
static_assert(kCalibRowsPerChunk % kSweepPartWarps == 0, "a chunk splits into equal quarters");

__host__ __device__ int sweep_bin_tile(int n_bins) {
  return n_bins < kSweepBinTile ? n_bins : kSweepBinTile;
}

template <typename A>
__global__ void __launch_bounds__(32 * kSweepPartWarps)
    calibration_sweep_partials_kernel(SweepLaunch p) {
  extern __shared__ unsigned char smem_raw[];
  __shared__ double nll_parts[kSweepPartWarps][32];
  const int K = p.n_temps, nb = p.n_bins, tile = sweep_bin_tile(nb);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int k = static_cast<int>(blockIdx.y) * 32 + lane;
  const int k_safe = k < K ? k : K - 1;  // lanes past K read a real column and write nothing
  double* sums = reinterpret_cast<double*>(smem_raw);  // [warp][bin][lane]
  int* counts = reinterpret_cast<int*>(sums + kSweepPartWarps * tile * 32);  // the same
  int* hits = counts + kSweepPartWarps * tile * 32;
  const int mine = warp * tile * 32 + lane;  // this lane's slot of the tile's first bin
  const int64_t chunk = blockIdx.x;
  const int64_t first = chunk * kCalibRowsPerChunk + warp * kSweepPartSlice;
  const int64_t left = p.n_rows - first;
  const int rows =
      left <= 0 ? 0 : static_cast<int>(left < kSweepPartSlice ? left : kSweepPartSlice);
  const A* __restrict__ conf = static_cast<const A*>(p.conf);
  const A* __restrict__ nll = static_cast<const A*>(p.nll);
  for (int b0 = static_cast<int>(blockIdx.z) * tile; b0 < nb;
       b0 += static_cast<int>(gridDim.z) * tile) {
    const int n = nb - b0 < tile ? nb - b0 : tile;
    for (int b = 0; b < n; ++b) {
      sums[mine + 32 * b] = 0.0;
      counts[mine + 32 * b] = 0;
      hits[mine + 32 * b] = 0;
    }
    double total = 0.0;
    for (int j0 = 0; j0 < rows; j0 += kSweepPartBatch) {
      A c[kSweepPartBatch], l[kSweepPartBatch];
      bool keep[kSweepPartBatch], hit[kSweepPartBatch];
#pragma unroll
      for (int u = 0; u < kSweepPartBatch; ++u) {  // past the quarter's end: its last row again
        const int64_t i = first + (j0 + u < rows ? j0 + u : rows - 1);
        keep[u] = j0 + u < rows && p.target[i] != p.ignore_index;
        hit[u] = p.correct[i];
        c[u] = conf[i * K + k_safe];
        l[u] = nll[i * K + k_safe];
      }
#pragma unroll
      for (int u = 0; u < kSweepPartBatch; ++u) {
        if (!keep[u]) continue;
        total += static_cast<double>(l[u]);
        const int b = bin_index(c[u], p.boundaries, nb) - b0;
        if (b >= 0 && b < n) {
          counts[mine + 32 * b] += 1;
          sums[mine + 32 * b] += static_cast<double>(c[u]);
          hits[mine + 32 * b] += hit[u] && c[u] == c[u] ? 1 : 0;  // NaN: never correct
        }
      }
    }
    nll_parts[warp][lane] = total;
    __syncthreads();
    for (int s = threadIdx.x; s < 32 * n; s += blockDim.x) {  // the quarters, in warp order
      const int b = s / 32, kk = static_cast<int>(blockIdx.y) * 32 + s % 32;
      if (kk >= K) continue;
      int64_t count = 0, hit = 0;
      double sum = 0.0;
      for (int w = 0; w < kSweepPartWarps; ++w) {
        const int at = w * tile * 32 + s;
        count += counts[at];
        sum += sums[at];
        hit += hits[at];
      }
      const int64_t out = (chunk * K + kk) * nb + b0 + b;
      p.part_counts[out] = count;
      p.part_sums[out] = sum;
      p.part_hits[out] = hit;
    }
    if (b0 == 0 && threadIdx.x < 32 && k < K) {
      double sum = 0.0;
      for (int w = 0; w < kSweepPartWarps; ++w) sum += nll_parts[w][lane];
      p.part_nll[chunk * K + k] = sum;
    }
    __syncthreads();  // every bin read before the next tile's zeros
  }
}

// The rows kernel's layout for a row of `chunks` 16-byte chunks (<= 4096): 8 chunks a thread
// where the row has 32 or more, fewer for shorter rows, 4 threads a row at least (several rows a
// warp): the per-row work (two reductions, the row's scalars) shared by as many elements as fit.
RowLayout calibration_layout(int64_t chunks) {
  if (chunks > 4096) return {};
  const int items = chunks >= 32 ? 8 : pow2_at_least((chunks + 3) / 4);
  const int tpr = pow2_at_least((chunks + items - 1) / items);
  return {tpr < 4 ? 4 : tpr, items, 1};
}

// Calls f(tpr, items) as integral constants for a calibration_layout (false if l is none).
template <typename F>
bool with_calibration_layout(const RowLayout& l, F&& f) {
  using std::integral_constant;
  auto run = [&](auto tpr, auto items) {
    f(tpr, items);
    return true;
  };
  using I4 = integral_constant<int, 4>;
  using I8 = integral_constant<int, 8>;
  switch (l.tpr * 10 + l.items) {
    case 4 * 10 + 1: return run(I4{}, integral_constant<int, 1>{});
    case 4 * 10 + 2: return run(I4{}, integral_constant<int, 2>{});
    case 4 * 10 + 4: return run(I4{}, I4{});
    case 4 * 10 + 8: return run(I4{}, I8{});
    case 8 * 10 + 8: return run(I8{}, I8{});
    case 16 * 10 + 8: return run(integral_constant<int, 16>{}, I8{});
    case 32 * 10 + 8: return run(integral_constant<int, 32>{}, I8{});
    case 64 * 10 + 8: return run(integral_constant<int, 64>{}, I8{});
    case 128 * 10 + 8: return run(integral_constant<int, 128>{}, I8{});
    case 256 * 10 + 8: return run(integral_constant<int, 256>{}, I8{});
    case 512 * 10 + 8: return run(integral_constant<int, 512>{}, I8{});
  }
  return false;
}

}  // namespace

cudaError_t launch_calibration_rows(const CalibrationLaunch& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int vec = 16 / sizeof(T);
    bool in_registers = false;
    if constexpr (!std::is_same_v<T, double>) {  // float64 (tests, not speed) is streamed
      const RowLayout l = calibration_layout((p.n_classes + vec - 1) / vec);
      in_registers = with_calibration_layout(l, [&](auto tpr, auto items) {
        constexpr int TPR = tpr.value, ROWS = threads_of(TPR) / TPR;
        int64_t blocks = (p.n_rows + ROWS - 1) / ROWS;
        blocks = blocks < 1 ? 1 : (blocks > INT_MAX ? INT_MAX : blocks);
        if (p.vectorized) {
          calibration_rows_kernel<T, TPR, items.value, true>
              <<<static_cast<unsigned>(blocks), threads_of(TPR), 0, stream>>>(p);
        } else {
          calibration_rows_kernel<T, TPR, items.value, false>
              <<<static_cast<unsigned>(blocks), threads_of(TPR), 0, stream>>>(p);
        }
      });
    }
    if (!in_registers) {
      calibration_rows_stream_kernel<T><<<row_blocks(p.n_rows), 32 * kRowWarps, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_calibration_top(const CalibrationLaunch& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(calib_top_blocks(p.n_rows)), p.mode == -1 ? 2 : 1);
  if (p.dtype == DType::Float64) calibration_top_kernel<double><<<grid, kTopThreads, 0, stream>>>(p);
  else calibration_top_kernel<float><<<grid, kTopThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_calibration_classwise(const CalibrationLaunch& p, bool from_logits,
                                         cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    const bool shared = p.n_bins <= kCalibSharedClasswiseBins;
    const int threads = shared ? classwise_threads(p.n_bins) : 128;
    const int64_t cw_chunks = calib_classwise_chunks(p.n_rows, p.n_classes, p.n_bins);
    const int64_t rows_per_chunk = p.n_rows == 0 ? 1 : (p.n_rows + cw_chunks - 1) / cw_chunks;
    const int64_t class_blocks = (p.n_classes + threads - 1) / threads;
    const dim3 grid(static_cast<unsigned>(cw_chunks),
                    static_cast<unsigned>(class_blocks < 65535 ? class_blocks : 65535));
    if (shared) {
      calibration_classwise_partials_kernel<decltype(tag), true>
          <<<grid, threads, static_cast<size_t>(threads) * p.n_bins * 16, stream>>>(
              p, from_logits, rows_per_chunk);
    } else {
      calibration_classwise_partials_kernel<decltype(tag), false>
          <<<grid, threads, 0, stream>>>(p, from_logits, rows_per_chunk);
    }
    if (cw_chunks == 1) return cudaGetLastError();  // the partials are the state itself
    const int64_t slots = p.n_classes * p.n_bins;
    const int64_t blocks = (slots + 255) / 256;
    calibration_reduce_kernel<int64_t><<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535),
                                         256, 0, stream>>>(
        p.cw_part_counts, p.cw_part_sums, p.cw_part_hits, cw_chunks, slots, p.cw_counts,
        p.cw_conf_sums, p.cw_hits);
    return cudaGetLastError();
  });
}

cudaError_t launch_calibration_sweep(const SweepLaunch& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename MathType<T>::type;
    if (p.n_rows > 0) {  // J = ceil(K / 32) sums a lane, rounded up to a power of two
      const unsigned blocks = row_blocks(p.n_rows);
      const int J = p.n_temps <= 32 ? 1 : pow2_at_least((p.n_temps + 31) / 32);
      if (J == 1) calibration_sweep_rows_kernel<T, 1><<<blocks, 32 * kRowWarps, 0, stream>>>(p);
      else if (J == 2) calibration_sweep_rows_kernel<T, 2><<<blocks, 32 * kRowWarps, 0, stream>>>(p);
      else if (J == 4) calibration_sweep_rows_kernel<T, 4><<<blocks, 32 * kRowWarps, 0, stream>>>(p);
      else calibration_sweep_rows_kernel<T, 8><<<blocks, 32 * kRowWarps, 0, stream>>>(p);
    }
    const int64_t chunks = calib_chunks(p.n_rows);
    const int tile = sweep_bin_tile(p.n_bins);
    const int64_t tiles = (p.n_bins + tile - 1) / tile;
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>((p.n_temps + 31) / 32),
                    static_cast<unsigned>(tiles < 65535 ? tiles : 65535));
    calibration_sweep_partials_kernel<A><<<grid, 32 * kSweepPartWarps,
                                           static_cast<size_t>(kSweepPartWarps) * tile * 32 * 16,
                                           stream>>>(p);
    const int64_t slots = static_cast<int64_t>(p.n_temps) * p.n_bins;
    calibration_reduce_kernel<int64_t><<<static_cast<unsigned>((slots + 255) / 256), 256, 0,
                                         stream>>>(p.part_counts, p.part_sums, p.part_hits,
                                                   chunks, slots, p.counts, p.conf_sums, p.hits);
    calibration_reduce_kernel<int64_t><<<static_cast<unsigned>((p.n_temps + 255) / 256), 256, 0,
                                         stream>>>(nullptr, p.part_nll, nullptr, chunks,
                                                   p.n_temps, nullptr, p.nll_sums, nullptr);
    return cudaGetLastError();
  });
}

}  // namespace calibkernels
