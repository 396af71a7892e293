// The CPU focal-loss row loops' shared pieces (csrc/cpu/focal_loss_cpu.cpp, the forward and
// gradient phases over whole rows; focal_loss_phases_cpu.cpp, the phases over a window of classes):
// the call's arguments, the split exp sum, the gradient from exp(x - m) and the RowStats rows.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../focal_loss_row.h"
#include "cpu_exp.h"

#if !defined(CPU_CAPABILITY)
#error "csrc/cpu/ is compiled once per CPU capability, with -DCPU_CAPABILITY=..."
#endif

namespace calibkernels {
namespace CPU_CAPABILITY {  // one copy per instruction set (kernels.h)

// The tensors of one call, as the row loops see them. tgt_t is the storage type of
// probability targets (the input's, or the math type).
template <typename scalar_t, typename tgt_t>
struct FocalLossCpuArgs {
  using scalar_type = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* input;
  const int64_t* index;  // class-index targets (N), or null
  const tgt_t* probs;    // class-probability targets (N, C), or null
  const acc_t* weight;   // (C), or null: every class weighs 1
  int64_t n_rows, n_classes, ignore_index;
  int64_t class_count;  // the classes the smoothing mass eps / C spreads over: n_classes, unless
                        // the rows are a window of wider ones (focal_loss_phases_cpu.cpp)
  GammaSchedule schedule;
  acc_t smoothing;   // epsilon
  acc_t weight_sum;  // sum_k w_k
  acc_t scale;       // 1 / the mean's divisor, or 1
  acc_t* loss_rows;  // (N), forward only
  acc_t* stats;      // (N, kRowStats): written by the forward when it writes a gradient, read by
                     // the gradient phase
  scalar_t* grad;    // (N, C) output, or null
  const acc_t* grad_output;  // gradient phase: (N) for "none", else one value
  bool go_per_row;

  bool dense() const { return probs != nullptr || smoothing > acc_t(0); }
};

// Returns {#k with x_k == m, sum of exp(x_k - m) over the other k} and, when out is given, stores
// each exp(x_k - m) there, so that the gradient pass scales them instead of computing exp again.
template <typename acc_t>
std::pair<acc_t, acc_t> exp_sum_split(const acc_t* x, acc_t m, acc_t* out, int64_t C) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vm(m), one(acc_t(1));
  Vec rest0(acc_t(0)), rest1(acc_t(0)), n_max(acc_t(0));  // two chains hide the add latency
  int64_t k = 0;
  for (; k + 2 * V <= C; k += 2 * V) {
    const Vec x0 = Vec::loadu(x + k), x1 = Vec::loadu(x + k + V);
    const Vec e0 = vexp(x0 - vm), e1 = vexp(x1 - vm);
    if (out) {
      e0.store(out + k);
      e1.store(out + k + V);
    }
    rest0 = rest0 + (e0 & (x0 != vm));  // != is true for NaN: a NaN logit makes the row NaN
    rest1 = rest1 + (e1 & (x1 != vm));
    n_max = n_max + (one & (x0 == vm)) + (one & (x1 == vm));
  }
  for (; k < C; k += V) {
    const int64_t n = std::min<int64_t>(V, C - k);
    const Vec x0 = Vec::loadu(x + k, n);
    const Vec e0 = vexp(x0 - vm);
    if (out) e0.store(out + k, n);
    rest0 = Vec::set(rest0, rest0 + (e0 & (x0 != vm)), n);
    n_max = Vec::set(n_max, n_max + (one & (x0 == vm)), n);
  }
  const auto sum = [](const Vec& u, const Vec& v) { return u + v; };
  return {at::vec::vec_reduce_all<acc_t>(sum, n_max),
          at::vec::vec_reduce_all<acc_t>(sum, rest0 + rest1)};
}

#if defined(CPU_CAPABILITY_AVX512)
// The float row loop in AVX-512 mask registers: a masked add where at::vec needs compare, and,
// add; the lanes equal to m are counted by popcount on the integer units, off the busy FP pipes.
// NEQ_UQ is true for NaN: a NaN logit lands in the sum and makes the row NaN, as in torch.
inline std::pair<float, float> exp_sum_split(const float* x, float m, float* out, int64_t C) {
  const __m512 vm = _mm512_set1_ps(m);
  __m512 rest0 = _mm512_setzero_ps(), rest1 = rest0;
  int64_t n_rest = 0;
  int64_t k = 0;
  for (; k + 32 <= C; k += 32) {
    const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
    const __m512 e0 = exp_fast512(_mm512_sub_ps(x0, vm)), e1 = exp_fast512(_mm512_sub_ps(x1, vm));
    if (out) {
      _mm512_storeu_ps(out + k, e0);
      _mm512_storeu_ps(out + k + 16, e1);
    }
    const __mmask16 r0 = _mm512_cmp_ps_mask(x0, vm, _CMP_NEQ_UQ);
    const __mmask16 r1 = _mm512_cmp_ps_mask(x1, vm, _CMP_NEQ_UQ);
    rest0 = _mm512_mask_add_ps(rest0, r0, rest0, e0);
    rest1 = _mm512_mask_add_ps(rest1, r1, rest1, e1);
    n_rest += _mm_popcnt_u32(_cvtmask16_u32(r0)) + _mm_popcnt_u32(_cvtmask16_u32(r1));
  }
  for (; k < C; k += 16) {
    const __mmask16 live = C - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (C - k)) - 1u);
    const __m512 x0 = _mm512_maskz_loadu_ps(live, x + k);
    const __m512 e0 = exp_fast512(_mm512_sub_ps(x0, vm));
    if (out) _mm512_mask_storeu_ps(out + k, live, e0);
    const __mmask16 r0 = live & _mm512_cmp_ps_mask(x0, vm, _CMP_NEQ_UQ);
    rest0 = _mm512_mask_add_ps(rest0, r0, rest0, e0);
    n_rest += _mm_popcnt_u32(_cvtmask16_u32(r0));
  }
  return {static_cast<float>(C - n_rest), _mm512_reduce_add_ps(_mm512_add_ps(rest0, rest1))};
}

#endif

// The gradient row from e_k = exp(x_k - m), in place: d loss / d x_k = coef (p_k S - a_k G_k)
// (RowStats), the true class of an index target coef g_y. aG: a_k G_k when the caller has them;
// otherwise they are formed from x (gamma > 0) or are a_k (gamma == 0, where G = 1).
template <typename scalar_t, typename tgt_t>
void grad_from_exp(const FocalLossCpuArgs<scalar_t, tgt_t>& a, at::opmath_type<scalar_t>* e,
                   const at::opmath_type<scalar_t>* x, const at::opmath_type<scalar_t>* t,
                   int64_t y, const RowStats<at::opmath_type<scalar_t>>& r,
                   at::opmath_type<scalar_t> coef, const at::opmath_type<scalar_t>* aG) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t C = a.n_classes;
  const acc_t* w = a.weight;
  const acc_t S_s = r.S / r.s, eps = a.smoothing;
  const acc_t b = eps / static_cast<acc_t>(a.class_count);
  if (!a.dense()) {
    const acc_t c = S_s * coef;  // a_k = 0 but for the true class
    at::vec::map([c](const Vec& v) { return v * Vec(c); }, e, e, C);
  } else if (aG != nullptr || r.gamma != acc_t(0)) {
    for (int64_t k = 0; k < C; ++k) {
      acc_t aG_k;
      if (aG != nullptr) {
        aG_k = aG[k];
      } else {
        const acc_t w_k = w ? w[k] : acc_t(1);
        const acc_t a_k = t ? ((acc_t(1) - eps) * t[k] + b) * w_k : b * w_k;
        aG_k = a_k * focal_terms((x[k] - r.m) - r.log_s, r.gamma).G;
      }
      e[k] = (e[k] * S_s - aG_k) * coef;
    }
  } else if (t != nullptr) {  // gamma = 0: a_k G_k = a_k
    const acc_t c1 = acc_t(1) - eps;
    for (int64_t k = 0; k < C; ++k) {
      e[k] = (e[k] * S_s - (c1 * t[k] + b) * (w ? w[k] : acc_t(1))) * coef;
    }
  } else if (w != nullptr) {
    at::vec::map2([S_s, b, coef](const Vec& v, const Vec& wk) {
      return (v * Vec(S_s) - Vec(b) * wk) * Vec(coef);
    }, e, e, w, C);
  } else {
    at::vec::map([S_s, b, coef](const Vec& v) { return (v * Vec(S_s) - Vec(b)) * Vec(coef); },
                 e, e, C);
  }
  if (y >= 0) e[y] = r.g_y * coef;
}

// Writes one row's RowStats.
template <typename acc_t>
void store_stats(acc_t* stats, int64_t i, const RowStats<acc_t>& r) {
  acc_t* o = stats + i * kRowStats;
  o[0] = r.m; o[1] = r.s; o[2] = r.log_s; o[3] = r.gamma; o[4] = r.S; o[5] = r.g_y; o[6] = r.scale;
}

template <typename acc_t>
RowStats<acc_t> load_stats(const acc_t* stats, int64_t i) {
  const acc_t* o = stats + i * kRowStats;
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
}

// An ignored sample: loss 0, gradient 0.
template <typename scalar_t, typename tgt_t>
void ignore_row(const FocalLossCpuArgs<scalar_t, tgt_t>& a, int64_t i) {
  using acc_t = at::opmath_type<scalar_t>;
  if (a.loss_rows) a.loss_rows[i] = acc_t(0);
  if (a.grad) std::memset(static_cast<void*>(a.grad + i * a.n_classes), 0, sizeof(scalar_t) * a.n_classes);
  if (a.stats && a.loss_rows) store_stats(a.stats, i, RowStats<acc_t>{});
}

}  // namespace CPU_CAPABILITY
}  // namespace calibkernels
