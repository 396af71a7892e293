// Fused calibration state on CUDA (CONTRACT §2). A warp per row reads the logits (or
// probabilities) once: online softmax statistics, confidence, prediction. The binned sums are
// then formed per chunk of rows and reduced over the chunks in a fixed order: integer counts,
// float64 sums, no float atomics, so every run gives the same bits. Never a host sync; a target
// out of range or a probability outside [0, 1] turns its sample NaN instead of reading astray.
#include <cuda_runtime.h>

#include "../calibration_row.h"
#include "calibration_launch.h"
#include "cuda_utils.cuh"

namespace calibkernels {
namespace {

constexpr int kRowWarps = 8;  // rows (warps) per block of the row kernel

// Running (max, first index of the max, sum of exp(x - max)) of a set of values.
template <typename A>
struct ArgSoftmax {
  A m, s;
  int64_t idx;
};

template <typename A>
__device__ __forceinline__ ArgSoftmax<A> merge(const ArgSoftmax<A>& a, const ArgSoftmax<A>& b) {
  ArgSoftmax<A> o;
  o.m = a.m > b.m ? a.m : b.m;
  if (a.m == b.m) o.idx = a.idx < b.idx ? a.idx : b.idx;  // torch.argmax: the lowest index
  else o.idx = a.m > b.m ? a.idx : b.idx;
  const A sa = a.s == A(0) ? A(0) : a.s * ck_exp(a.m - o.m);
  const A sb = b.s == A(0) ? A(0) : b.s * ck_exp(b.m - o.m);
  o.s = sa + sb;
  return o;
}

template <typename T>
__global__ void __launch_bounds__(32 * kRowWarps) calibration_rows_kernel(CalibrationLaunch p) {
  using A = typename MathType<T>::type;
  constexpr int VEC = 16 / sizeof(T);
  const T* __restrict__ input = static_cast<const T*>(p.input);
  const int lane = threadIdx.x % 32;
  const int64_t C = p.n_classes;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
       r < p.n_rows; r += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const T* __restrict__ row = input + r * C;
    ArgSoftmax<A> st{-INFINITY, A(0), C};
    bool outside = false;  // a probability outside [0, 1] (or NaN)
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
        if (base + k >= C) continue;
        outside |= !(v[k] >= A(0) && v[k] <= A(1));
        if (v[k] > st.m) {
          st.s = st.s == A(0) ? A(0) : st.s * ck_exp(st.m - v[k]);
          st.m = v[k];
          st.idx = base + k;
        }
        if (p.from_logits) st.s += ck_exp(v[k] - st.m);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      ArgSoftmax<A> o;
      o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
      o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
      o.idx = __shfl_xor_sync(0xffffffffu, st.idx, off);
      st = merge(st, o);
      outside |= __shfl_xor_sync(0xffffffffu, static_cast<int>(outside), off) != 0;
    }
    if (lane == 0) {
      const int64_t y = p.target[r];
      const bool bad = y != p.ignore_index && (y < 0 || y >= C);
      A conf = p.from_logits ? A(1) / st.s : st.m;  // exp(m - m) / s: the top probability
      if (bad || (!p.from_logits && outside)) conf = A(NAN);
      static_cast<A*>(p.confidence)[r] = conf;
      p.correct[r] = st.idx == y;
      if (p.row_max != nullptr) {
        static_cast<A*>(p.row_max)[r] = st.m;
        static_cast<A*>(p.row_sum)[r] = bad ? A(NAN) : st.s;
      }
    }
  }
}

// Top-label sums of one chunk of rows: bins computed once per row into shared memory, then one
// thread per bin adds its rows up in row order.
template <typename A>
__global__ void calibration_top_partials_kernel(CalibrationLaunch p) {
  extern __shared__ unsigned char smem_raw[];
  int* bins = reinterpret_cast<int*>(smem_raw);  // kCalibRowsPerChunk entries; -1: ignored
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kCalibRowsPerChunk;
  const int64_t rows =
      p.n_rows - first < kCalibRowsPerChunk ? p.n_rows - first : kCalibRowsPerChunk;
  const A* __restrict__ conf = static_cast<const A*>(p.confidence);
  for (int64_t j = threadIdx.x; j < rows; j += blockDim.x) {
    const int64_t i = first + j;
    bins[j] = p.target[i] == p.ignore_index ? -1 : bin_index(conf[i], p.boundaries, p.n_bins);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < p.n_bins; b += blockDim.x) {
    int64_t count = 0, hit = 0;
    double sum = 0.0;
    for (int64_t j = 0; j < rows; ++j) {
      if (bins[j] != b) continue;
      count += 1;
      sum += static_cast<double>(conf[first + j]);
      hit += p.correct[first + j] ? 1 : 0;
    }
    const int64_t at = static_cast<int64_t>(blockIdx.x) * p.n_bins + b;
    p.part_counts[at] = count;
    p.part_sums[at] = sum;
    p.part_hits[at] = hit;
  }
}

// Sums partials[chunk][slot] over the chunks, in chunk order, for every slot.
__global__ void calibration_reduce_kernel(const int64_t* __restrict__ part_counts,
                                          const double* __restrict__ part_sums,
                                          const int64_t* __restrict__ part_hits, int64_t chunks,
                                          int64_t slots, int64_t* __restrict__ counts,
                                          double* __restrict__ sums, int64_t* __restrict__ hits) {
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < slots;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t count = 0, hit = 0;
    double sum = 0.0;
    for (int64_t g = 0; g < chunks; ++g) {
      count += part_counts[g * slots + s];
      sum += part_sums[g * slots + s];
      hit += part_hits[g * slots + s];
    }
    counts[s] = count;
    sums[s] = sum;
    hits[s] = hit;
  }
}

// Classwise sums: a thread per class (consecutive classes: coalesced reads), the rows of one
// chunk in order, the thread's bins in shared memory.
template <typename T>
__global__ void calibration_classwise_partials_kernel(CalibrationLaunch p, int64_t rows_per_chunk) {
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
  if (k < p.n_classes) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t y = p.target[i];
      if (y == p.ignore_index) continue;
      A pk = to_math(input[i * p.n_classes + k]);
      if (p.from_logits) {
        pk = ck_exp(pk - static_cast<const A*>(p.row_max)[i]) /
             static_cast<const A*>(p.row_sum)[i];
      } else if (!(pk >= A(0) && pk <= A(1)) ||
                 static_cast<const A*>(p.confidence)[i] != static_cast<const A*>(p.confidence)[i]) {
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

template <typename T>
cudaError_t launch_typed(const CalibrationLaunch& p, cudaStream_t stream) {
  using A = typename MathType<T>::type;
  if (p.n_rows > 0) {
    const int64_t blocks = (p.n_rows + kRowWarps - 1) / kRowWarps;
    calibration_rows_kernel<T><<<static_cast<unsigned>(blocks < 1048576 ? blocks : 1048576),
                                 32 * kRowWarps, 0, stream>>>(p);
  }
  const int64_t chunks = calib_top_chunks(p.n_rows);
  calibration_top_partials_kernel<A><<<static_cast<unsigned>(chunks), 128,
                                       kCalibRowsPerChunk * sizeof(int), stream>>>(p);
  calibration_reduce_kernel<<<1, 128, 0, stream>>>(p.part_counts, p.part_sums, p.part_hits,
                                                   chunks, p.n_bins, p.counts, p.conf_sums,
                                                   p.hits);
  if (p.classwise) {
    const int threads = classwise_threads(p.n_bins);
    const int64_t cw_chunks = calib_classwise_chunks(p.n_rows, p.n_classes, p.n_bins);
    const int64_t rows_per_chunk = p.n_rows == 0 ? 1 : (p.n_rows + cw_chunks - 1) / cw_chunks;
    const dim3 grid(static_cast<unsigned>(cw_chunks),
                    static_cast<unsigned>((p.n_classes + threads - 1) / threads));
    calibration_classwise_partials_kernel<T>
        <<<grid, threads, static_cast<size_t>(threads) * p.n_bins * 16, stream>>>(
            p, rows_per_chunk);
    const int64_t slots = p.n_classes * p.n_bins;
    const int64_t blocks = (slots + 255) / 256;
    calibration_reduce_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), 256, 0,
                                stream>>>(p.cw_part_counts, p.cw_part_sums, p.cw_part_hits,
                                          cw_chunks, slots, p.cw_counts, p.cw_conf_sums,
                                          p.cw_hits);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_calibration(const CalibrationLaunch& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype,
                        [&](auto tag) { return launch_typed<decltype(tag)>(p, stream); });
}

}  // namespace calibkernels
