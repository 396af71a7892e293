// Row primitives the CPU kernels share: a row in the math type, its max, the first index of it.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "csrc/cpu/ is compiled once per CPU capability, with -DCPU_CAPABILITY=..."
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace calibkernels {
namespace CPU_CAPABILITY {  // one copy per instruction set (cpu/kernels.h)

// One row in the math type: the row itself, or its widened copy in buf.
template <typename acc_t, typename T>
const acc_t* row_in_math(const T* src, acc_t* buf, int64_t C) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return src;
  } else {
    at::vec::convert(src, buf, C);
    return buf;
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// Four independent max chains: one chain waits on the max latency for every vector. A NaN
// may be dropped here, but it makes the exp sum, and so the loss, NaN all the same.
inline float row_max(const float* x, int64_t C) {
  __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  int64_t k = 0;
  for (; k + 64 <= C; k += 64) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + k));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + k + 16));
    m2 = _mm512_max_ps(m2, _mm512_loadu_ps(x + k + 32));
    m3 = _mm512_max_ps(m3, _mm512_loadu_ps(x + k + 48));
  }
  for (; k < C; k += 16) {
    const __mmask16 live = C - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (C - k)) - 1u);
    m0 = _mm512_mask_max_ps(m0, live, m0, _mm512_maskz_loadu_ps(live, x + k));
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}
#endif

template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t C) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::reduce_all<acc_t>([](const Vec& u, const Vec& v) { return at::vec::maximum(u, v); },
                                    x, C);
}

// The first k with row[k] == m (torch.argmax's tie rule), a vector of lanes at a time.
template <typename acc_t>
int64_t first_index_of(const acc_t* row, acc_t m, int64_t C) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t k = 0;
  for (; k + V <= C; k += V) {
    const int mask = (Vec::loadu(row + k) != Vec(m)).zero_mask();  // bit set where equal
    if (mask != 0) return k + __builtin_ctz(mask);
  }
  for (; k < C; ++k) {
    if (row[k] == m) return k;
  }
  return C - 1;  // no lane equals m: a NaN row; predict the last class, as nothing else fits
}

// sum_k f(row[k]) over [begin, end), a vector of lanes at a time.
template <typename acc_t, typename F>
acc_t sum_range(const acc_t* row, int64_t begin, int64_t end, const F& f) {
  using Vec = at::vec::Vectorized<acc_t>;
  if (end <= begin) return acc_t(0);
  return at::vec::map_reduce_all<acc_t>(f, [](const Vec& u, const Vec& v) { return u + v; },
                                        row + begin, end - begin);
}

}  // namespace CPU_CAPABILITY
}  // namespace calibkernels
