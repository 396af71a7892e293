// exp for the CPU kernels' hot loops (float): Cody-Waite reduction x = n ln2 + r, a degree-5
// polynomial for exp(r) on |r| <= ln2/2 (minimax for relative error, fitted for these kernels:
// 8.4e-8 before rounding), 2^n through the exponent bits. Within 2.2 ulp of exp (1 ulp for the
// Cephes degree-7 form it replaced, which cost 3 more FP instructions per vector, ~17% of the
// exp loop); exp(0) is exactly 1. Below ln(FLT_MIN) it underflows as exp does, to the subnormal
// or 0 that torch gives (a gradient entry of exp(-100) is 3.78e-44, not FLT_MIN).
#pragma once

#if !defined(CPU_CAPABILITY)
#error "csrc/cpu/ is compiled once per CPU capability, with -DCPU_CAPABILITY=..."
#endif

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace calibkernels {
namespace CPU_CAPABILITY {  // one copy per instruction set (cpu/kernels.h)

#if defined(CPU_CAPABILITY_AVX512)
// The same arithmetic in AVX-512, with scalef for the 2^n step: identical results for x <= 88
// (the kernels pass x - max <= 0).
inline __m512 exp_fast512(__m512 x) {
  // max_ps returns its second operand when one is NaN: NaN stays NaN, -inf becomes the floor
  // (exp(-104) rounds to 0); scalef rounds p 2^n once into the subnormals below 2^-126.
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(0x1.0f8628p-7f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0x1.573c0ap-5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0x1.555a82p-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0x1.fffdc2p-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0x1.fffff8p-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

inline at::vec::Vectorized<float> exp_fast(const at::vec::Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return exp_fast512(x);
#else
  using Vec = at::vec::Vectorized<float>;
  using IVec = at::vec::Vectorized<int32_t>;
  const Vec xc = at::vec::clamp(x, Vec(-104.0f), Vec(88.37626f));  // exp(-104) rounds to 0
  const Vec n = (xc * Vec(1.44269504088896341f)).round();
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), xc);  // ln 2 in two parts: exact n * hi
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  Vec p = Vec(0x1.0f8628p-7f);
  p = at::vec::fmadd(p, r, Vec(0x1.573c0ap-5f));
  p = at::vec::fmadd(p, r, Vec(0x1.555a82p-3f));
  p = at::vec::fmadd(p, r, Vec(0x1.fffdc2p-2f));
  p = at::vec::fmadd(p, r, Vec(0x1.fffff8p-1f));
  p = at::vec::fmadd(p, r, Vec(1.0f));
  // 2^n as two normal factors for n in [-150, 128]: p 2^n1 is exact, and the second product
  // rounds once, into the subnormals or to 0 below 2^-126, as exp does.
  const IVec ni = at::vec::convert_to_int_of_same_size(n);
  const IVec n1 = ni >> IVec(1), n2 = ni - n1;
  return (p * at::vec::cast<float>((n1 + IVec(127)) << IVec(23))) *
         at::vec::cast<float>((n2 + IVec(127)) << IVec(23));
#endif
}

// exp_fast for float vectors, Sleef's exp for double.
template <typename Vec>
inline Vec vexp(const Vec& x) {
  if constexpr (std::is_same_v<Vec, at::vec::Vectorized<float>>) return exp_fast(x);
  else return x.exp();
}

}  // namespace CPU_CAPABILITY
}  // namespace calibkernels
