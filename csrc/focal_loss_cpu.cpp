// Fused focal loss on the CPU: one pass over each row computes the loss and, when asked, the
// gradient. Rows run in parallel (parallel_rows); the dense loops use at::vec.
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_exp.h"
#include "cpu_parallel.h"
#include "ops.h"

namespace calibkernels {
namespace {

template <typename scalar_t>
struct FocalLossCpuArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* logits;
  const int64_t* target;
  const acc_t* weight;  // nullptr: every class weighs 1
  int64_t n_rows, n_classes, ignore_index;
  GammaSchedule schedule;
  acc_t smoothing;   // epsilon
  acc_t weight_sum;  // sum_k w_k
  acc_t grad_scale;  // 1 / mean's divisor, or 1
  acc_t* loss_rows;
  scalar_t* grad;  // nullptr: loss only
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

// The per-row epilogue of focal_loss_row.h without label smoothing, for Vec::size() rows at once
// (lanes are rows): from each row's max m, split exp sum (n_max, rest), x_y and w_y, the loss
// -w_y f(p_y), the factor c with d loss / d x_j = c exp(x_j - m) for j != y, and d loss / d x_y.
// Lane by lane the same formulas as the scalar helpers, so a row's result never depends on
// which rows share its batch.
template <typename acc_t>
struct RowStats {
  static constexpr int B = at::vec::Vectorized<acc_t>::size();
  acc_t m[B], n_max[B], rest[B], x_y[B], w_y[B];  // inputs
  acc_t loss[B], c[B], grad_y[B];                  // outputs
};

// log1p(e), e in [0, 1/2], as log(u) e / (u - 1) with u = 1 + e (Goldberg): a few ulp from one
// vector log; Sleef's vector log1p and expm1 cost several times an exp.
template <typename Vec>
Vec log1p_small(const Vec& e) {
  const Vec u = Vec(1) + e, d = u - Vec(1);
  return Vec::blendv(u.log() * (e / d), e, d == Vec(0));
}

// expm1(x), x in [-ln 2, 0], as (u - 1) x / log(u) with u = exp(x) (Kahan): likewise.
template <typename Vec>
Vec expm1_small(const Vec& x, const Vec& u) {
  const Vec d = u - Vec(1);
  return Vec::blendv(d * (x / u.log()), x, d == Vec(0));
}

template <typename acc_t>
void unsmoothed_epilogue(RowStats<acc_t>& r, const GammaSchedule& sched, acc_t scale) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec one(acc_t(1)), zero(acc_t(0));
  const Vec n_max = Vec::loadu(r.n_max), rest = Vec::loadu(r.rest);
  const Vec excess = (n_max - one) + rest;  // log_sum_exp_shifted
  const Vec log_s = Vec::blendv((one + excess).log(), log1p_small(excess), excess < Vec(acc_t(0.5)));
  const Vec lp = (Vec::loadu(r.x_y) - Vec::loadu(r.m)) - log_s;
  const Vec p = lp.exp();
  Vec gamma(static_cast<acc_t>(sched.fallback));  // select_gamma: the first j with p < t_j
  for (int j = sched.n - 1; j >= 0; --j) {
    gamma = Vec::blendv(gamma, Vec(static_cast<acc_t>(sched.gammas[j])),
                        p < Vec(static_cast<acc_t>(sched.thresholds[j])));
  }
  const Vec q = Vec::blendv(zero - expm1_small(lp, p), one - p, lp < Vec(acc_t(-0.6931471805599453)));
  Vec qg = one;  // pow_gamma: products for integer gamma <= 8, pow for the rest
  for (int j = 1; j <= 8; ++j) qg = Vec::blendv(qg, qg * q, Vec(acc_t(j)) <= gamma);
  const Vec integral = (gamma == gamma.round()) & (gamma <= Vec(acc_t(8)));
  if (integral.zero_mask() != 0) qg = Vec::blendv(q.pow(gamma), qg, integral);
  const Vec ratio = Vec::blendv(Vec(acc_t(-1)), lp / q, q > zero);
  const Vec p_ratio = Vec::blendv(zero, p * ratio, p > zero);
  const Vec w_y = Vec::loadu(r.w_y);
  const Vec aG_y = w_y * (qg * (one - gamma * p_ratio));
  (zero - w_y * (qg * lp)).store(r.loss);
  (aG_y * Vec(scale) / (n_max + rest)).store(r.c);
  ((zero - q * aG_y) * Vec(scale)).store(r.grad_y);
}

// Rows [begin, end) without label smoothing: each batch of rows is read for its max and exp sum
// (exp(x - m) kept in the gradient rows), one vector epilogue runs, then the rows are scaled.
template <typename scalar_t>
void unsmoothed_rows(const FocalLossCpuArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  constexpr int B = RowStats<acc_t>::B;
  const int64_t C = a.n_classes;
  // Small rows are batched for the vector epilogue; a batch (<= 8 KiB) stays in L1 between visits.
  const int64_t batch = std::clamp<int64_t>(2048 / C, 1, B);
  std::vector<acc_t> row_buf(kReduced ? batch * C : 0), grad_buf(kReduced && a.grad ? batch * C : 0);
  RowStats<acc_t> r;
  for (int64_t i0 = begin; i0 < end; i0 += batch) {
    const int64_t rows = std::min(batch, end - i0);
    for (int l = 0; l < B; ++l) {  // idle lanes compute on harmless values
      r.m[l] = r.x_y[l] = r.rest[l] = r.w_y[l] = acc_t(0);
      r.n_max[l] = acc_t(1);
    }
    for (int64_t l = 0; l < rows; ++l) {
      const int64_t i = i0 + l, y = a.target[i];
      if (y == a.ignore_index) continue;
      const acc_t* x;
      if constexpr (kReduced) {
        at::vec::convert(a.logits + i * C, row_buf.data() + l * C, C);
        x = row_buf.data() + l * C;
      } else {
        x = a.logits + i * C;
      }
      acc_t* out = !a.grad ? nullptr : kReduced ? grad_buf.data() + l * C
                                                : reinterpret_cast<acc_t*>(a.grad + i * C);
      r.m[l] = row_max(x, C);
      std::tie(r.n_max[l], r.rest[l]) = exp_sum_split(x, r.m[l], out, C);
      r.x_y[l] = x[y];
      r.w_y[l] = a.weight ? a.weight[y] : acc_t(1);
    }
    unsmoothed_epilogue(r, a.schedule, a.grad_scale);
    for (int64_t l = 0; l < rows; ++l) {
      const int64_t i = i0 + l, y = a.target[i];
      scalar_t* g = a.grad ? a.grad + i * C : nullptr;
      if (y == a.ignore_index) {
        a.loss_rows[i] = acc_t(0);
        if (g) std::memset(static_cast<void*>(g), 0, sizeof(scalar_t) * C);
        continue;
      }
      a.loss_rows[i] = r.loss[l];
      if (!g) continue;
      acc_t* out = kReduced ? grad_buf.data() + l * C : reinterpret_cast<acc_t*>(g);
      using Vec = at::vec::Vectorized<acc_t>;
      const acc_t c = r.c[l];
      at::vec::map([c](const Vec& e) { return e * Vec(c); }, out, out, C);
      out[y] = r.grad_y[l];
      if constexpr (kReduced) at::vec::convert(out, g, C);
    }
  }
}

template <typename scalar_t>
void focal_loss_cpu_kernel(const FocalLossCpuArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  const int64_t C = a.n_classes;
  const acc_t eps = a.smoothing;
  const acc_t b = eps / static_cast<acc_t>(C);  // smoothed target mass of every class
  const acc_t scale = a.grad_scale;
  const acc_t* w = a.weight;

  parallel_rows(a.n_rows, C, [&](int64_t begin, int64_t end) {
    if (eps == acc_t(0)) return unsmoothed_rows(a, begin, end);
    // With label smoothing, row by row. Reduced-precision rows are widened once into row_buf; the gradient is built in grad_buf.
    std::vector<acc_t> row_buf(kReduced ? C : 0);
    std::vector<acc_t> grad_buf(kReduced && a.grad ? C : 0);
    std::vector<acc_t> aG;  // a_k G_k, only for smoothing with gamma > 0
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = a.target[i];
      scalar_t* g = a.grad ? a.grad + i * C : nullptr;
      if (y == a.ignore_index) {
        a.loss_rows[i] = acc_t(0);
        if (g) std::memset(static_cast<void*>(g), 0, sizeof(scalar_t) * C);
        continue;
      }
      const acc_t* x;
      if constexpr (kReduced) {
        at::vec::convert(a.logits + i * C, row_buf.data(), C);
        x = row_buf.data();
      } else {
        x = a.logits + i * C;
      }
      acc_t* out = nullptr;
      if (g) {
        if constexpr (kReduced) out = grad_buf.data();
        else out = g;
      }

      const acc_t m = row_max(x, C);
      // out holds exp(x - m) from here on
      const auto [n_max, rest] = exp_sum_split(x, m, out, C);
      const acc_t s = n_max + rest, log_s = log_sum_exp_shifted(n_max, rest);
      const acc_t lp_y = (x[y] - m) - log_s;
      const acc_t p_y = std::exp(lp_y);
      const acc_t gamma = select_gamma(a.schedule, p_y);
      const FocalTerms<acc_t> ty = focal_terms(lp_y, p_y, gamma);
      const acc_t w_y = w ? w[y] : acc_t(1);
      // a_y = (1 - eps) w_y + b w_y: the one-hot part here, the smoothing part in the sums below.
      const acc_t a1_y = (acc_t(1) - eps) * w_y;

      acc_t loss = a1_y * ty.f;
      acc_t S_other = 0;     // sum over k != y of a_k G_k
      acc_t aG_y = a1_y * ty.G;
      if (gamma == acc_t(0)) {
        // G = 1 and f = log p: the smoothing terms are sums of log-probabilities and weights.
        const acc_t sum_wlp =
            w ? at::vec::map2_reduce_all<acc_t>(
                    [m, log_s](const Vec& v, const Vec& wk) { return (v - Vec(m) - Vec(log_s)) * wk; },
                    [](const Vec& u, const Vec& v) { return u + v; }, x, w, C)
              : at::vec::map_reduce_all<acc_t>(
                    [m, log_s](const Vec& v) { return v - Vec(m) - Vec(log_s); },
                    [](const Vec& u, const Vec& v) { return u + v; }, x, C);
        loss += b * sum_wlp;
        S_other = b * (a.weight_sum - w_y);
        aG_y += b * w_y;
        if (out) {
          const acc_t S = S_other + aG_y, inv_s = acc_t(1) / s;
          if (w) {
            at::vec::map2(
                [inv_s, S, b, scale](const Vec& e, const Vec& wk) {
                  return (e * Vec(inv_s) * Vec(S) - Vec(b) * wk) * Vec(scale);
                },
                out, out, w, C);
          } else {
            at::vec::map(
                [inv_s, S, b, scale](const Vec& e) {
                  return (e * Vec(inv_s) * Vec(S) - Vec(b)) * Vec(scale);
                },
                out, out, C);
          }
        }
      } else {
        // Every class carries target mass and its own (1 - p_k)^gamma: the per-class math.
        // A serial sum of C terms: accumulate in double, or float loses ~C ulps.
        aG.resize(C);
        double loss_sum = 0.0, S_sum = 0.0;
        for (int64_t k = 0; k < C; ++k) {
          const acc_t a_k = b * (w ? w[k] : acc_t(1));
          const FocalTerms<acc_t> tk = focal_terms((x[k] - m) - log_s, gamma);
          loss_sum += static_cast<double>(a_k * tk.f);
          aG[k] = a_k * tk.G;
          if (k != y) S_sum += static_cast<double>(aG[k]);
        }
        loss += static_cast<acc_t>(loss_sum);
        S_other = static_cast<acc_t>(S_sum);
        aG_y += aG[y];
        if (out) {
          const acc_t S = S_other + aG_y, inv_s = acc_t(1) / s;
          at::vec::map2(
              [inv_s, S, scale](const Vec& e, const Vec& ag) {
                return (e * Vec(inv_s) * Vec(S) - ag) * Vec(scale);
              },
              out, out, aG.data(), C);
        }
      }
      a.loss_rows[i] = -loss;
      if (out) {
        out[y] = true_class_grad(ty, S_other, aG_y) * scale;
        if constexpr (kReduced) at::vec::convert(out, g, C);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> focal_loss_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    at::ArrayRef<double> thresholds, at::ArrayRef<double> gammas, double gamma_default,
    int64_t ignore_index, double label_smoothing, c10::string_view reduction, bool compute_grad) {
  const GammaSchedule schedule = check_focal_loss_args(logits, target, weight, thresholds, gammas,
                                                       gamma_default, label_smoothing);
  const Reduction red = parse_reduction(reduction);
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = target.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = weight.has_value() ? weight->to(acc_type).contiguous() : at::Tensor();
  at::Tensor loss_rows = at::empty({N}, x.options().dtype(acc_type));
  at::Tensor grad = compute_grad ? at::empty({N, C}, x.options()) : at::empty({0}, x.options());

  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focal_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* tp = t.const_data_ptr<int64_t>();
    const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    // One serial pass validates the targets and sums mean's divisor in a fixed order.
    double divisor = 0.0;
    for (int64_t i = 0; i < N; ++i) {
      const int64_t y = tp[i];
      if (y == ignore_index) continue;
      TORCH_CHECK_INDEX(y >= 0 && y < C, "focal_loss: target ", y, " at position ", i,
                        " is out of range for ", C, " classes (and is not ignore_index=",
                        ignore_index, ")");
      divisor += wp ? static_cast<double>(wp[y]) : 1.0;
    }
    double weight_sum = static_cast<double>(C);
    if (wp) {
      weight_sum = 0.0;
      for (int64_t k = 0; k < C; ++k) weight_sum += wp[k];
    }
    FocalLossCpuArgs<scalar_t> args{};
    args.logits = x.const_data_ptr<scalar_t>();
    args.target = tp;
    args.weight = wp;
    args.n_rows = N;
    args.n_classes = C;
    args.ignore_index = ignore_index;
    args.schedule = schedule;
    args.smoothing = static_cast<acc_t>(label_smoothing);
    args.weight_sum = static_cast<acc_t>(weight_sum);
    args.grad_scale = red == Reduction::Mean ? static_cast<acc_t>(1.0 / divisor) : acc_t(1);
    args.loss_rows = loss_rows.mutable_data_ptr<acc_t>();
    args.grad = compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    focal_loss_cpu_kernel<scalar_t>(args);

    if (red == Reduction::None) {
      loss = loss_rows;
    } else {
      // A serial double sum: the same result for any thread count.
      double total = 0.0;
      for (int64_t i = 0; i < N; ++i) total += static_cast<double>(args.loss_rows[i]);
      if (red == Reduction::Mean) total /= divisor;  // 0 / 0 = NaN when all are ignored, as torch
      loss = at::scalar_tensor(total, x.options().dtype(acc_type));
    }
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(calibkernels, CPU, m) { m.impl("focal_loss", &focal_loss_cpu); }

}  // namespace calibkernels
