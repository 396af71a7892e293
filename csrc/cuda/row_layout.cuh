// A row held in registers across TPR threads (the focal-loss fast path and the calibration rows
// kernel): the layout by row length, reductions over the threads of a row whose result is the
// same, run-to-run identical value in every thread of the row, and the per-chunk element math.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "cuda_utils.cuh"

namespace calibkernels {

// Threads of a block for TPR threads a row: several rows a block below 256 threads a row.
__host__ __device__ constexpr int threads_of(int tpr) { return tpr < 256 ? 256 : tpr; }

__device__ __forceinline__ float shfl_xor(float v, int off) {
  return __shfl_xor_sync(0xffffffffu, v, off);
}
__device__ __forceinline__ double shfl_xor(double v, int off) {
  return __shfl_xor_sync(0xffffffffu, v, off);
}
__device__ __forceinline__ int shfl_xor(int v, int off) {
  return __shfl_xor_sync(0xffffffffu, v, off);
}
__device__ __forceinline__ float2 shfl_xor(float2 v, int off) {
  return {__shfl_xor_sync(0xffffffffu, v.x, off), __shfl_xor_sync(0xffffffffu, v.y, off)};
}

// Over the TPR threads of a row: a shuffle tree, then (TPR > 32) the row's warps in order through
// shared memory. Every thread of the row gets the same, run-to-run identical value. UNROLL: the
// warps' values loaded at once (a wide V loaded 16 at a time would spill).
template <int TPR, int UNROLL = 32, typename V, typename Op>
__device__ __forceinline__ V row_reduce(V v, V* smem, Op op) {
#pragma unroll
  for (int off = (TPR < 32 ? TPR : 32) / 2; off > 0; off /= 2) v = op(v, shfl_xor(v, off));
  if constexpr (TPR > 32) {
    constexpr int W = TPR / 32;
    const int warp = threadIdx.x / 32, first = warp / W * W;
    __syncthreads();  // the slots may still be read by the previous reduction
    if (threadIdx.x % 32 == 0) smem[warp] = v;
    __syncthreads();
    v = smem[first];
#pragma unroll UNROLL
    for (int j = 1; j < W; ++j) v = op(v, smem[first + j]);
  }
  return v;
}

// Tells the compiler the chunk changed: each pass converts it again from its packed registers
// instead of keeping every converted float alive across the row's reductions (which spills).
template <typename Chunk>
__device__ __forceinline__ void keep_packed(Chunk& c) {
  static_assert(sizeof(Chunk) == 16, "16-byte chunks");
  unsigned* u = reinterpret_cast<unsigned*>(&c);
  asm volatile("" : "+r"(u[0]), "+r"(u[1]), "+r"(u[2]), "+r"(u[3]));
}

constexpr float kLog2e = 1.4426950408889634f;

// 2^v, results below 2^-126 flushed to 0: for a row's sum of exp(x - max), which is at least 1.
// (The focal gradient uses expf: torch's accuracy and subnormals, for 3 more instructions.)
__device__ __forceinline__ float exp2_ftz(float v) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}

// The largest (smallest) value of a chunk, NaN-blind like fmaxf: 16-bit types two at a time,
// exactly.
__device__ __forceinline__ float chunk_max(const Pack<float, 4>& c) {
  return fmaxf(fmaxf(c.v[0], c.v[1]), fmaxf(c.v[2], c.v[3]));
}
template <typename H>
__device__ __forceinline__ float chunk_max(const Pack<H, 8>& c) {
  using H2 = std::conditional_t<std::is_same_v<H, __half>, __half2, __nv_bfloat162>;
  const H2* h = reinterpret_cast<const H2*>(c.v);
  const H2 m = __hmax2(__hmax2(h[0], h[1]), __hmax2(h[2], h[3]));
  return fmaxf(to_math(m.x), to_math(m.y));
}
__device__ __forceinline__ float chunk_min(const Pack<float, 4>& c) {
  return fminf(fminf(c.v[0], c.v[1]), fminf(c.v[2], c.v[3]));
}
template <typename H>
__device__ __forceinline__ float chunk_min(const Pack<H, 8>& c) {
  using H2 = std::conditional_t<std::is_same_v<H, __half>, __half2, __nv_bfloat162>;
  const H2* h = reinterpret_cast<const H2*>(c.v);
  const H2 m = __hmin2(__hmin2(h[0], h[1]), __hmin2(h[2], h[3]));
  return fminf(to_math(m.x), to_math(m.y));
}

inline int pow2_at_least(int64_t v) {
  int r = 1;
  while (r < v) r *= 2;
  return r;
}

struct RowLayout {
  int tpr = 0, items = 0, cluster = 0;  // tpr == 0: rows too long for registers
};

// Threads a row and 16-byte chunks a thread for a row of `chunks` chunks held in one block's
// registers: several rows a warp (<= 32 chunks), a warp a row (<= 128), 64-256 threads a row with
// 4 chunks each (<= 1024), 256-512 threads with 8 each (<= 4096 chunks: 64 KB).
inline RowLayout register_row_layout(int64_t chunks) {
  if (chunks <= 32) return {pow2_at_least(chunks < 4 ? 4 : chunks), 1, 1};
  if (chunks <= 128) return {32, pow2_at_least((chunks + 31) / 32), 1};
  if (chunks <= 1024) return {pow2_at_least((chunks + 3) / 4), 4, 1};
  if (chunks <= 4096) return {pow2_at_least((chunks + 7) / 8), 8, 1};
  return {};
}

// Calls f(tpr, items) as integral constants for a register_row_layout (false if l is none).
template <typename F>
bool with_register_layout(const RowLayout& l, F&& f) {
  using std::integral_constant;
  auto run = [&](auto tpr, auto items) {
    f(tpr, items);
    return true;
  };
  using I1 = integral_constant<int, 1>;
  using I2 = integral_constant<int, 2>;
  using I4 = integral_constant<int, 4>;
  using I8 = integral_constant<int, 8>;
  if (l.cluster > 1) return false;
  switch (l.tpr * 10 + l.items) {
    case 4 * 10 + 1: return run(integral_constant<int, 4>{}, I1{});
    case 8 * 10 + 1: return run(integral_constant<int, 8>{}, I1{});
    case 16 * 10 + 1: return run(integral_constant<int, 16>{}, I1{});
    case 32 * 10 + 1: return run(integral_constant<int, 32>{}, I1{});
    case 32 * 10 + 2: return run(integral_constant<int, 32>{}, I2{});
    case 32 * 10 + 4: return run(integral_constant<int, 32>{}, I4{});
    case 64 * 10 + 4: return run(integral_constant<int, 64>{}, I4{});
    case 128 * 10 + 4: return run(integral_constant<int, 128>{}, I4{});
    case 256 * 10 + 4: return run(integral_constant<int, 256>{}, I4{});
    case 256 * 10 + 8: return run(integral_constant<int, 256>{}, I8{});
    case 512 * 10 + 8: return run(integral_constant<int, 512>{}, I8{});
  }
  return false;
}

}  // namespace calibkernels
