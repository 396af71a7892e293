// Fused calibration state on CUDA (CONTRACT §2). A warp per row reads the logits (or
// probabilities) once: its prediction and both readings of it (softmax: confidence 1 / s, Brier,
// NLL; probabilities: the top value, Brier, NLL), from sums that leave out the true class so that
// nothing cancels as p_y -> 1, and whether its values lie in [0, 1]. The binned sums of a reading
// are then formed per chunk of rows and reduced over the chunks in a fixed order: integer
// counts, float64 sums, no float atomics, so every run gives the same bits. Never a host sync; a
// target out of range turns its sample NaN instead of reading astray.
#include <cuda_runtime.h>

#include "../calibration_row.h"
#include "calibration_launch.h"
#include "cuda_utils.cuh"

namespace calibkernels {
namespace {

constexpr int kRowWarps = 8;  // rows (warps) per block of the row kernels

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

template <typename T>
__global__ void __launch_bounds__(32 * kRowWarps) calibration_rows_kernel(CalibrationLaunch p) {
  using A = typename MathType<T>::type;
  constexpr int VEC = 16 / sizeof(T);
  const T* __restrict__ input = static_cast<const T*>(p.input);
  A* __restrict__ samples = static_cast<A*>(p.samples);
  const int lane = threadIdx.x % 32;
  const int64_t C = p.n_classes;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
       r < p.n_rows; r += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const T* __restrict__ row = input + r * C;
    const int64_t y = p.target[r];
    const bool kept = y != p.ignore_index;
    const bool bad = kept && (y < 0 || y >= C);
    const int64_t y_safe = kept && !bad ? y : 0;  // never read out of bounds for a bad target
    RowState<A> st{-INFINITY, A(0), A(0), A(0), C, false};
    for (int64_t base = static_cast<int64_t>(lane) * VEC; base < C; base += 32 * VEC) {
      A v[VEC];
      if (p.vectorized) {
        const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(row + base);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = to_math(pk.v[k]);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = base + k < C ? to_math(row[base + k]) : A(0);
      }
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
      const A x_y = to_math(row[y_safe]);
      const A z_y = x_y - st.m;
      const A s = st.other + ck_exp(z_y);
      const A q = A(1) - x_y;
      A* o = samples + r * kSampleColumns;
      const bool poison_p = bad || st.outside;  // a value outside [0, 1]: not probabilities
      o[kConfL] = bad ? A(NAN) : A(1) / s;
      o[kBrierL] = bad ? A(NAN) : (st.other2 + st.other * st.other) / (s * s);
      o[kNllL] = bad ? A(NAN) : (z_y == A(0) ? ck_log1p(st.other) : ck_log(s) - z_y);
      o[kConfP] = poison_p ? A(NAN) : st.m;
      o[kBrierP] = poison_p ? A(NAN) : st.sq + q * q;
      o[kNllP] = poison_p ? A(NAN) : -ck_log(x_y);
      o[kRowMax] = st.m;
      o[kRowSum] = bad ? A(NAN) : s;
      p.correct[r] = st.idx == y;
      p.inside[r] = !kept || !st.outside;
    }
  }
}

// Top-label sums of one chunk of rows under one reading: bins computed once per row into shared
// memory, then one thread per bin adds its rows up in row order; thread 0 the Brier and NLL.
template <typename A>
__global__ void calibration_top_partials_kernel(CalibrationLaunch p, int column) {
  extern __shared__ unsigned char smem_raw[];
  int* bins = reinterpret_cast<int*>(smem_raw);  // kCalibRowsPerChunk entries; -1: ignored
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kCalibRowsPerChunk;
  const int64_t rows =
      p.n_rows - first < kCalibRowsPerChunk ? p.n_rows - first : kCalibRowsPerChunk;
  const A* __restrict__ samples = static_cast<const A*>(p.samples);
  for (int64_t j = threadIdx.x; j < rows; j += blockDim.x) {
    const int64_t i = first + j;
    bins[j] = p.target[i] == p.ignore_index
                  ? -1
                  : bin_index(samples[i * kSampleColumns + column], p.boundaries, p.n_bins);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < p.n_bins; b += blockDim.x) {
    int64_t count = 0, hit = 0;
    double sum = 0.0;
    for (int64_t j = 0; j < rows; ++j) {
      if (bins[j] != b) continue;
      count += 1;
      sum += static_cast<double>(samples[(first + j) * kSampleColumns + column]);
      hit += p.correct[first + j] ? 1 : 0;
    }
    const int64_t at = static_cast<int64_t>(blockIdx.x) * p.n_bins + b;
    p.part_counts[at] = count;
    p.part_sums[at] = sum;
    p.part_hits[at] = hit;
  }
  if (threadIdx.x == 0) {
    double brier = 0.0, nll = 0.0;
    for (int64_t j = 0; j < rows; ++j) {
      if (bins[j] < 0) continue;
      brier += static_cast<double>(samples[(first + j) * kSampleColumns + column + 1]);
      nll += static_cast<double>(samples[(first + j) * kSampleColumns + column + 2]);
    }
    p.part_totals[blockIdx.x * 2] = brier;
    p.part_totals[blockIdx.x * 2 + 1] = nll;
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
// chunk in order, the thread's bins in shared memory.
template <typename T>
__global__ void calibration_classwise_partials_kernel(CalibrationLaunch p, bool from_logits,
                                                      int64_t rows_per_chunk) {
  using A = typename MathType<T>::type;
  extern __shared__ unsigned char smem_raw[];
  const int nb = p.n_bins;
  double* sums = reinterpret_cast<double*>(smem_raw);                   // [blockDim][nb]
  int* counts = reinterpret_cast<int*>(sums + blockDim.x * nb);         // [blockDim][nb]
  int* hits = counts + blockDim.x * nb;                                 // [blockDim][nb]
  for (int b = 0; b < nb; ++b) {
    sums[threadIdx.x * nb + b] = 0.0;
    counts[threadIdx.x * nb + b] = 0;
    hits[threadIdx.x * nb + b] = 0;
  }
  const int64_t k = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_chunk;
  const int64_t last = first + rows_per_chunk < p.n_rows ? first + rows_per_chunk : p.n_rows;
  const T* __restrict__ input = static_cast<const T*>(p.input);
  const A* __restrict__ samples = static_cast<const A*>(p.samples);
  if (k < p.n_classes) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t y = p.target[i];
      if (y == p.ignore_index) continue;
      const A* s = samples + i * kSampleColumns;
      A pk = to_math(input[i * p.n_classes + k]);
      if (from_logits) {
        pk = ck_exp(pk - s[kRowMax]) / s[kRowSum];
      } else if (s[kConfP] != s[kConfP]) {
        pk = A(NAN);  // a poisoned row
      }
      const int b = bin_index(pk, p.boundaries, nb);
      counts[threadIdx.x * nb + b] += 1;
      sums[threadIdx.x * nb + b] += static_cast<double>(pk);
      hits[threadIdx.x * nb + b] += y == k ? 1 : 0;
    }
    const int64_t slots = p.n_classes * nb;
    for (int b = 0; b < nb; ++b) {
      const int64_t at = static_cast<int64_t>(blockIdx.x) * slots + k * nb + b;
      p.cw_part_counts[at] = counts[threadIdx.x * nb + b];
      p.cw_part_sums[at] = sums[threadIdx.x * nb + b];
      p.cw_part_hits[at] = hits[threadIdx.x * nb + b];
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

// ---- the temperature sweep: a warp per row, the row re-read from cache for each T ----

template <typename T>
__global__ void __launch_bounds__(32 * kRowWarps) calibration_sweep_rows_kernel(SweepLaunch p) {
  using A = typename MathType<T>::type;
  const T* __restrict__ logits = static_cast<const T*>(p.logits);
  A* __restrict__ conf = static_cast<A*>(p.conf);
  A* __restrict__ nll = static_cast<A*>(p.nll);
  const int lane = threadIdx.x % 32;
  const int64_t C = p.n_classes;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
       r < p.n_rows; r += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const T* __restrict__ row = logits + r * C;
    const int64_t y = p.target[r];
    const bool kept = y != p.ignore_index && y >= 0 && y < C;
    const int64_t y_safe = kept ? y : 0;
    A m = -INFINITY;
    int64_t idx = C;
    for (int64_t c = lane; c < C; c += 32) {
      const A v = to_math(row[c]);
      if (v > m) {
        m = v;
        idx = c;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      const A om = __shfl_xor_sync(0xffffffffu, m, off);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, idx, off);
      if (om > m || (om == m && oi < idx)) {
        m = om;
        idx = oi;
      }
    }
    const A z_y_raw = to_math(row[y_safe]) - m;
    for (int k = 0; k < p.n_temps; ++k) {
      const A inv_t = static_cast<A>(1.0 / p.temperatures[k]);
      A other = 0;
      for (int64_t c = lane; c < C; c += 32) {
        if (c == y_safe) continue;
        const A v = to_math(row[c]);
        other += v == -INFINITY ? A(0) : ck_exp((v - m) * inv_t);
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) other += __shfl_xor_sync(0xffffffffu, other, off);
      if (lane == 0) {
        const A z_y = z_y_raw * inv_t;
        const A s = other + ck_exp(z_y);
        conf[r * p.n_temps + k] = kept || y == p.ignore_index ? A(1) / s : A(NAN);
        nll[r * p.n_temps + k] = z_y == A(0) ? ck_log1p(other) : ck_log(s) - z_y;
      }
    }
    if (lane == 0) p.correct[r] = idx == y;
  }
}

// The bins and NLL sum of one chunk of rows at one temperature (blockIdx.y).
template <typename A>
__global__ void calibration_sweep_partials_kernel(SweepLaunch p) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kCalibRowsPerChunk;
  const int64_t rows =
      p.n_rows - first < kCalibRowsPerChunk ? p.n_rows - first : kCalibRowsPerChunk;
  const int k = blockIdx.y;
  const A* __restrict__ conf = static_cast<const A*>(p.conf);
  const A* __restrict__ nll = static_cast<const A*>(p.nll);
  const int64_t slot0 = (static_cast<int64_t>(blockIdx.x) * p.n_temps + k) * p.n_bins;
  for (int b = threadIdx.x; b < p.n_bins; b += blockDim.x) {
    int64_t count = 0, hit = 0;
    double sum = 0.0;
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t i = first + j;
      if (p.target[i] == p.ignore_index) continue;
      const A c = conf[i * p.n_temps + k];
      if (bin_index(c, p.boundaries, p.n_bins) != b) continue;
      count += 1;
      sum += static_cast<double>(c);
      hit += p.correct[i] ? 1 : 0;
    }
    p.part_counts[slot0 + b] = count;
    p.part_sums[slot0 + b] = sum;
    p.part_hits[slot0 + b] = hit;
  }
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t i = first + j;
      if (p.target[i] != p.ignore_index) total += static_cast<double>(nll[i * p.n_temps + k]);
    }
    p.part_nll[static_cast<int64_t>(blockIdx.x) * p.n_temps + k] = total;
  }
}

}  // namespace

cudaError_t launch_calibration_rows(const CalibrationLaunch& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    calibration_rows_kernel<decltype(tag)><<<row_blocks(p.n_rows), 32 * kRowWarps, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_calibration_top(const CalibrationLaunch& p, bool from_logits,
                                   cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using A = typename MathType<decltype(tag)>::type;
    const int64_t chunks = calib_top_chunks(p.n_rows);
    calibration_top_partials_kernel<A><<<static_cast<unsigned>(chunks), 128,
                                         kCalibRowsPerChunk * sizeof(int), stream>>>(
        p, from_logits ? kConfL : kConfP);
    calibration_reduce_kernel<int64_t><<<1, 128, 0, stream>>>(
        p.part_counts, p.part_sums, p.part_hits, chunks, p.n_bins, p.counts, p.conf_sums, p.hits);
    calibration_reduce_kernel<int64_t><<<1, 32, 0, stream>>>(
        nullptr, p.part_totals, nullptr, chunks, 2, nullptr, p.totals, nullptr);
    return cudaGetLastError();
  });
}

cudaError_t launch_calibration_classwise(const CalibrationLaunch& p, bool from_logits,
                                         cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    const int threads = classwise_threads(p.n_bins);
    const int64_t cw_chunks = calib_classwise_chunks(p.n_rows, p.n_classes, p.n_bins);
    const int64_t rows_per_chunk = p.n_rows == 0 ? 1 : (p.n_rows + cw_chunks - 1) / cw_chunks;
    const dim3 grid(static_cast<unsigned>(cw_chunks),
                    static_cast<unsigned>((p.n_classes + threads - 1) / threads));
    calibration_classwise_partials_kernel<decltype(tag)>
        <<<grid, threads, static_cast<size_t>(threads) * p.n_bins * 16, stream>>>(
            p, from_logits, rows_per_chunk);
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
    if (p.n_rows > 0) {
      calibration_sweep_rows_kernel<T><<<row_blocks(p.n_rows), 32 * kRowWarps, 0, stream>>>(p);
    }
    const int64_t chunks = calib_top_chunks(p.n_rows);
    calibration_sweep_partials_kernel<A>
        <<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(p.n_temps)), 32, 0,
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
