// Fused focal loss on the CPU (CONTRACT §1). The forward phase reads each row once for its loss
// and, when asked, writes its gradient for grad_output = 1 and its RowStats (focal_loss_row.h);
// the gradient phase (backward) rewrites the gradient from the input and the RowStats with
// grad_output applied before rounding. Rows run in parallel (parallel_rows) over at::vec loops.
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_exp.h"
#include "cpu_parallel.h"
#include "cpu_rows.h"
#include "focal_loss_rows.h"
#include "../ops.h"
#include "kernels.h"

namespace calibkernels {
namespace CPU_CAPABILITY {
namespace {



// The per-row epilogue of focal_loss_row.h without label smoothing, for Vec::size() rows at once
// (lanes are rows): from each row's max m, split exp sum (n_max, rest), x_y and w_y, the loss
// -w_y f(p_y) and the row's RowStats. Lane by lane the same formulas as the scalar helpers, so a
// row's result never depends on which rows share its batch.
template <typename acc_t>
struct RowBatch {
  static constexpr int B = at::vec::Vectorized<acc_t>::size();
  acc_t m[B], n_max[B], rest[B], x_y[B], w_y[B];    // inputs
  acc_t loss[B], s[B], log_s[B], gamma[B], S[B], g_y[B];  // outputs
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
void unsmoothed_epilogue(RowBatch<acc_t>& r, const GammaSchedule& sched) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec one(acc_t(1)), zero(acc_t(0));
  const Vec n_max = Vec::loadu(r.n_max), rest = Vec::loadu(r.rest), m = Vec::loadu(r.m);
  const Vec excess = (n_max - one) + rest;  // log_sum_exp_shifted
  const Vec log_s = Vec::blendv((one + excess).log(), log1p_small(excess), excess < Vec(acc_t(0.5)));
  const Vec lp = (Vec::loadu(r.x_y) - m) - log_s;
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
  // A row whose max is +inf is NaN, as in torch (poisoned_max).
  const Vec nan(std::numeric_limits<acc_t>::quiet_NaN());
  const Vec poisoned = m == Vec(std::numeric_limits<acc_t>::infinity());
  Vec::blendv(zero - w_y * (qg * lp), nan, poisoned).store(r.loss);
  (n_max + rest).store(r.s);
  log_s.store(r.log_s);
  gamma.store(r.gamma);
  Vec::blendv(aG_y, nan, poisoned).store(r.S);
  Vec::blendv(zero - q * aG_y, nan, poisoned).store(r.g_y);
}

// Forward, class indices without label smoothing: each batch of rows is read for its max and exp
// sum (exp(x - m) kept in the gradient rows), one vector epilogue runs, then the rows are scaled.
template <typename scalar_t, typename tgt_t>
void index_rows(const FocalLossCpuArgs<scalar_t, tgt_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  constexpr int B = RowBatch<acc_t>::B;
  const int64_t C = a.n_classes;
  // Small rows are batched for the vector epilogue; a batch (<= 8 KiB) stays in L1 between visits.
  const int64_t batch = std::clamp<int64_t>(2048 / C, 1, B);
  std::vector<acc_t> row_buf(kReduced ? batch * C : 0), grad_buf(kReduced && a.grad ? batch * C : 0);
  RowBatch<acc_t> r;
  for (int64_t i0 = begin; i0 < end; i0 += batch) {
    const int64_t rows = std::min(batch, end - i0);
    for (int l = 0; l < B; ++l) {  // idle lanes compute on harmless values
      r.m[l] = r.x_y[l] = r.rest[l] = r.w_y[l] = acc_t(0);
      r.n_max[l] = acc_t(1);
    }
    for (int64_t l = 0; l < rows; ++l) {
      const int64_t i = i0 + l, y = a.index[i];
      if (y == a.ignore_index) continue;
      const acc_t* x = row_in_math(a.input + i * C, row_buf.data() + l * C, C);
      acc_t* out = !a.grad ? nullptr : kReduced ? grad_buf.data() + l * C
                                                : reinterpret_cast<acc_t*>(a.grad + i * C);
      r.m[l] = row_max(x, C);
      std::tie(r.n_max[l], r.rest[l]) = exp_sum_split(x, r.m[l], out, C);
      r.x_y[l] = x[y];
      r.w_y[l] = a.weight ? a.weight[y] : acc_t(1);
    }
    unsmoothed_epilogue(r, a.schedule);
    for (int64_t l = 0; l < rows; ++l) {
      const int64_t i = i0 + l, y = a.index[i];
      if (y == a.ignore_index) {
        ignore_row(a, i);
        continue;
      }
      a.loss_rows[i] = r.loss[l];
      if (!a.stats) continue;
      const RowStats<acc_t> st{r.m[l], r.s[l], r.log_s[l], r.gamma[l], r.S[l], r.g_y[l], a.scale};
      store_stats(a.stats, i, st);
      if (!a.grad) continue;
      acc_t* out = kReduced ? grad_buf.data() + l * C : reinterpret_cast<acc_t*>(a.grad + i * C);
      grad_from_exp(a, out, static_cast<const acc_t*>(nullptr), static_cast<const acc_t*>(nullptr),
                    y, st, a.scale, static_cast<const acc_t*>(nullptr));
      if constexpr (kReduced) at::vec::convert(out, a.grad + i * C, C);
    }
  }
}

// Forward with a dense target distribution (label smoothing, or probability targets), row by row:
// every class carries target mass a_k = ((1 - eps) t_k + eps / C) w_k (t one-hot for an index).
template <typename scalar_t, typename tgt_t>
void dense_rows(const FocalLossCpuArgs<scalar_t, tgt_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  const int64_t C = a.n_classes;
  const acc_t eps = a.smoothing, c1 = acc_t(1) - eps, b = eps / static_cast<acc_t>(C);
  const acc_t* w = a.weight;
  std::vector<acc_t> x_buf(kReduced ? C : 0), t_buf(a.probs ? C : 0), e_buf(C), aG;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t y = a.index ? a.index[i] : -1;
    if (a.index && y == a.ignore_index) {
      ignore_row(a, i);
      continue;
    }
    const acc_t* x = row_in_math(a.input + i * C, x_buf.data(), C);
    const acc_t* t = a.probs ? row_in_math(a.probs + i * C, t_buf.data(), C) : nullptr;
    // e holds exp(x - m) from here on: the gradient row itself when it is float.
    acc_t* e = a.grad && !kReduced ? reinterpret_cast<acc_t*>(a.grad + i * C) : e_buf.data();
    const acc_t m = row_max(x, C);
    const auto [n_max, rest] = exp_sum_split(x, m, e, C);
    RowStats<acc_t> r{};
    r.m = m;
    r.s = n_max + rest;
    r.log_s = log_sum_exp_shifted(n_max, rest);
    r.scale = a.scale;
    // gamma from the true-class probability, or from sum_k t_k p_k for probability targets.
    acc_t p_sel = acc_t(0);
    if (y >= 0) {
      p_sel = std::exp((x[y] - m) - r.log_s);
    } else if (a.schedule.n > 0) {
      p_sel = at::vec::map2_reduce_all<acc_t>([](const Vec& u, const Vec& v) { return u * v; },
                                              [](const Vec& u, const Vec& v) { return u + v; },
                                              t, e, C) / r.s;
    }
    r.gamma = select_gamma(a.schedule, p_sel);
    const bool focal = r.gamma != acc_t(0);
    acc_t loss;
    if (!focal && y >= 0) {
      // G = 1 and f = log p: the smoothing terms are sums of log-probabilities and weights.
      const acc_t sum_wlp =
          w ? at::vec::map2_reduce_all<acc_t>(
                  [m, r](const Vec& v, const Vec& wk) { return ((v - Vec(m)) - Vec(r.log_s)) * wk; },
                  [](const Vec& u, const Vec& v) { return u + v; }, x, w, C)
            : at::vec::map_reduce_all<acc_t>(
                  [m, r](const Vec& v) { return (v - Vec(m)) - Vec(r.log_s); },
                  [](const Vec& u, const Vec& v) { return u + v; }, x, C);
      const acc_t w_y = w ? w[y] : acc_t(1);
      const FocalTerms<acc_t> ty = focal_terms((x[y] - m) - r.log_s, p_sel, acc_t(0));
      const acc_t aG_y = (c1 + b) * w_y;
      const acc_t S_other = b * (a.weight_sum - w_y);
      loss = c1 * w_y * ty.f + b * sum_wlp;
      r.S = S_other + aG_y;
      r.g_y = true_class_grad(ty, S_other, aG_y);
      if (a.grad) grad_from_exp(a, e, x, t, y, r, a.scale, static_cast<const acc_t*>(nullptr));
    } else {
      // Every class carries its own (1 - p_k)^gamma: the per-class math. A serial sum of C terms:
      // accumulate in double, or float loses ~C ulps.
      aG.resize(C);
      double loss_sum = 0.0, S_sum = 0.0;
      for (int64_t k = 0; k < C; ++k) {
        const acc_t w_k = w ? w[k] : acc_t(1);
        const acc_t a_k = (t ? c1 * t[k] + b : b) * w_k;
        const FocalTerms<acc_t> tk = focal_terms((x[k] - m) - r.log_s, r.gamma);
        loss_sum += static_cast<double>(a_k * tk.f);
        aG[k] = a_k * tk.G;
        if (k != y) S_sum += static_cast<double>(aG[k]);
      }
      loss = static_cast<acc_t>(loss_sum);
      r.S = static_cast<acc_t>(S_sum);
      if (y >= 0) {
        // The one-hot part of the true class, and its gradient without cancellation.
        const acc_t w_y = w ? w[y] : acc_t(1);
        const FocalTerms<acc_t> ty = focal_terms((x[y] - m) - r.log_s, p_sel, r.gamma);
        loss += c1 * w_y * ty.f;
        const acc_t aG_y = aG[y] + c1 * w_y * ty.G;
        r.g_y = true_class_grad(ty, r.S, aG_y);
        aG[y] = aG_y;
        r.S += aG_y;
      }
      if (a.grad) grad_from_exp(a, e, x, t, y, r, a.scale, aG.data());
    }
    if (poisoned_max(m)) {
      loss = r.S = r.g_y = std::numeric_limits<acc_t>::quiet_NaN();
      if (a.grad) std::fill(e, e + C, r.S);
    }
    a.loss_rows[i] = -loss;
    if (a.stats) store_stats(a.stats, i, r);
    if constexpr (kReduced) {
      if (a.grad) at::vec::convert(e, a.grad + i * C, C);
    }
  }
}

// The gradient phase: grad = grad_output x d loss / d input from the input and the RowStats.
template <typename scalar_t, typename tgt_t>
void grad_rows(const FocalLossCpuArgs<scalar_t, tgt_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  const int64_t C = a.n_classes;
  std::vector<acc_t> x_buf(kReduced ? C : 0), t_buf(a.probs ? C : 0), e_buf(kReduced ? C : 0);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t y = a.index ? a.index[i] : -1;
    if (a.index && y == a.ignore_index) {
      ignore_row(a, i);
      continue;
    }
    const RowStats<acc_t> r = load_stats(a.stats, i);
    const acc_t* x = row_in_math(a.input + i * C, x_buf.data(), C);
    const acc_t* t = a.probs ? row_in_math(a.probs + i * C, t_buf.data(), C) : nullptr;
    acc_t* e = kReduced ? e_buf.data() : reinterpret_cast<acc_t*>(a.grad + i * C);
    const acc_t m = r.m;
    at::vec::map([m](const Vec& v) { return vexp(v - Vec(m)); }, e, x, C);
    const acc_t coef = a.grad_output[a.go_per_row ? i : 0] * r.scale;
    grad_from_exp(a, e, x, t, y, r, coef, static_cast<const acc_t*>(nullptr));
    if constexpr (kReduced) at::vec::convert(e, a.grad + i * C, C);
  }
}

// The tensors of a call, checked and unpacked into args; then f(args) with the right types.
template <typename F>
void with_args(const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
               const FocalLossOptions& o, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "focal_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto fill = [&](auto args) {
      args.input = input.const_data_ptr<scalar_t>();
      args.weight = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
      args.n_rows = input.size(0);
      args.n_classes = args.class_count = input.size(1);
      args.ignore_index = o.ignore_index;
      args.schedule = o.schedule;
      args.smoothing = static_cast<acc_t>(o.label_smoothing);
      f(args);
    };
    if (!o.prob_target) {
      FocalLossCpuArgs<scalar_t, acc_t> args{};
      args.index = target.const_data_ptr<int64_t>();
      fill(args);
    } else if (target.scalar_type() == input.scalar_type()) {
      FocalLossCpuArgs<scalar_t, scalar_t> args{};
      args.probs = target.const_data_ptr<scalar_t>();
      fill(args);
    } else {
      FocalLossCpuArgs<scalar_t, acc_t> args{};
      args.probs = target.const_data_ptr<acc_t>();
      fill(args);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> focal_loss_forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& gamma, int64_t ignore_index, double label_smoothing,
    c10::string_view reduction, bool compute_grad, std::optional<at::ScalarType> dtype,
    bool compute_stats) {
  const FocalLossOptions o = check_focal_loss_args(input, target, weight, gamma, ignore_index,
                                                   label_smoothing, reduction);
  const at::Tensor x = input.contiguous();
  const at::Tensor t = kernel_target(x, target, o.prob_target);
  const int64_t N = x.size(0), C = x.size(1);
  const auto acc_type = math_type(x.scalar_type());
  const at::Tensor w = weight.has_value() ? weight->to(acc_type).contiguous() : at::Tensor();
  at::Tensor loss_rows = at::empty({N}, x.options().dtype(acc_type));
  at::Tensor grad = compute_grad ? at::empty({N, C}, x.options()) : at::empty({0}, x.options());
  const bool with_stats = compute_grad || compute_stats;
  at::Tensor stats = at::empty({with_stats ? N : 0, kRowStats}, x.options().dtype(acc_type));
  double divisor = static_cast<double>(N);  // probability targets: the number of samples
  with_args(x, t, w, o, [&](auto args) {
    using acc_t = typename decltype(args)::acc_t;
    if (args.index) {
      // One serial pass validates the targets and sums mean's divisor in a fixed order.
      divisor = 0.0;
      for (int64_t i = 0; i < N; ++i) {
        const int64_t y = args.index[i];
        if (y == ignore_index) continue;
        TORCH_CHECK_INDEX(y >= 0 && y < C, "focal_loss: target ", y, " at position ", i,
                          " is out of range for ", C, " classes (and is not ignore_index=",
                          ignore_index, ")");
        divisor += args.weight ? static_cast<double>(args.weight[y]) : 1.0;
      }
    }
    double weight_sum = static_cast<double>(C);
    if (args.weight) weight_sum = std::accumulate(args.weight, args.weight + C, 0.0);
    args.weight_sum = static_cast<acc_t>(weight_sum);
    args.scale = o.reduction == Reduction::Mean ? static_cast<acc_t>(1.0 / divisor) : acc_t(1);
    args.loss_rows = loss_rows.mutable_data_ptr<acc_t>();
    args.grad = compute_grad ? grad.mutable_data_ptr<typename decltype(args)::scalar_type>()
                             : nullptr;
    args.stats = with_stats ? stats.mutable_data_ptr<acc_t>() : nullptr;
    parallel_rows(N, C, [&](int64_t begin, int64_t end) {
      if (args.dense()) dense_rows(args, begin, end);
      else index_rows(args, begin, end);
    });
  });
  const auto out_dtype = dtype.value_or(x.scalar_type());
  if (o.reduction == Reduction::None) return {loss_rows.to(out_dtype), grad, stats};
  // A serial double sum: the same result for any thread count.
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(loss_rows.scalar_type(), "focal_loss_sum", [&] {
    const scalar_t* l = loss_rows.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < N; ++i) total += static_cast<double>(l[i]);
  });
  if (o.reduction == Reduction::Mean) total /= divisor;  // 0 / 0 = NaN when all are ignored
  return {at::scalar_tensor(total, x.options().dtype(out_dtype)), grad, stats};
}

// Whether every value of a CPU tensor is 1, read in place (cheaper than eq().all().item() by
// microseconds, which a CIFAR-sized training step notices).
bool all_ones(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  bool ones = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "all_ones", [&] {
    const scalar_t* v = c.const_data_ptr<scalar_t>();
    for (int64_t i = 0, n = c.numel(); i < n && ones; ++i) ones = static_cast<double>(v[i]) == 1.0;
  });
  return ones;
}

// The gradient phase into `out` (contiguous (N, C), the input's dtype). in_place: `out` is the
// forward's gradient, already the answer where grad_output is 1.
void run_grad_rows(const at::Tensor& out, const at::Tensor& grad_output, const at::Tensor& input,
                   const at::Tensor& target, const std::optional<at::Tensor>& weight,
                   const at::Tensor& gamma, const at::Tensor& stats, int64_t ignore_index,
                   double label_smoothing, c10::string_view reduction, bool in_place) {
  const FocalLossOptions o = check_focal_loss_args(input, target, weight, gamma, ignore_index,
                                                   label_smoothing, reduction);
  check_backward_args(grad_output, input, stats, o.reduction, in_place ? &out : nullptr);
  if (in_place && all_ones(grad_output)) return;
  const at::Tensor x = input.contiguous();
  const int64_t N = x.size(0);
  const auto acc_type = math_type(x.scalar_type());
  const bool per_row = o.reduction == Reduction::None;
  const at::Tensor t = kernel_target(x, target, o.prob_target);
  if (!o.prob_target) {  // the op may be called directly: never index a row with a bad target
    const int64_t* tp = t.const_data_ptr<int64_t>();
    for (int64_t i = 0, C = x.size(1); i < N; ++i) {
      TORCH_CHECK_INDEX(tp[i] == ignore_index || (tp[i] >= 0 && tp[i] < C),
                        "focal_loss_backward: target ", tp[i], " at position ", i,
                        " is out of range for ", C, " classes");
    }
  }
  const at::Tensor w = weight.has_value() ? weight->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor go = grad_output.to(acc_type).contiguous().reshape(-1);
  const at::Tensor st = stats.contiguous();
  with_args(x, t, w, o, [&](auto args) {
    using acc_t = typename decltype(args)::acc_t;
    using scalar_t = typename decltype(args)::scalar_type;
    args.stats = const_cast<acc_t*>(st.const_data_ptr<acc_t>());
    args.grad = out.mutable_data_ptr<scalar_t>();
    args.grad_output = go.const_data_ptr<acc_t>();
    args.go_per_row = per_row;
    parallel_rows(N, x.size(1), [&](int64_t begin, int64_t end) { grad_rows(args, begin, end); });
  });
}

at::Tensor focal_loss_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                   const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight,
                                   const at::Tensor& gamma, const at::Tensor& stats,
                                   int64_t ignore_index, double label_smoothing,
                                   c10::string_view reduction) {
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  run_grad_rows(out, grad_output, input, target, weight, gamma, stats, ignore_index,
                label_smoothing, reduction, /*in_place=*/false);
  return out;
}

void focal_loss_backward_inplace_cpu(const at::Tensor& grad, const at::Tensor& grad_output,
                                     const at::Tensor& input, const at::Tensor& target,
                                     const std::optional<at::Tensor>& weight,
                                     const at::Tensor& gamma, const at::Tensor& stats,
                                     int64_t ignore_index, double label_smoothing,
                                     c10::string_view reduction) {
  run_grad_rows(grad, grad_output, input, target, weight, gamma, stats, ignore_index,
                label_smoothing, reduction, /*in_place=*/true);
}

}  // namespace

// This instruction set's entry points (kernels.h); csrc/cpu_dispatch.cpp picks one at run time.
std::tuple<at::Tensor, at::Tensor, at::Tensor> focal_loss_forward(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& gamma, int64_t ignore_index, double label_smoothing,
    c10::string_view reduction, bool compute_grad, std::optional<at::ScalarType> dtype,
    bool compute_stats) {
  return focal_loss_forward_cpu(input, target, weight, gamma, ignore_index, label_smoothing,
                                reduction, compute_grad, dtype, compute_stats);
}

at::Tensor focal_loss_backward(const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& target, const std::optional<at::Tensor>& weight,
                               const at::Tensor& gamma, const at::Tensor& stats,
                               int64_t ignore_index, double label_smoothing,
                               c10::string_view reduction) {
  return focal_loss_backward_cpu(grad_output, input, target, weight, gamma, stats, ignore_index,
                                 label_smoothing, reduction);
}

void focal_loss_backward_(const at::Tensor& grad, const at::Tensor& grad_output,
                          const at::Tensor& input, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight, const at::Tensor& gamma,
                          const at::Tensor& stats, int64_t ignore_index, double label_smoothing,
                          c10::string_view reduction) {
  focal_loss_backward_inplace_cpu(grad, grad_output, input, target, weight, gamma, stats,
                                  ignore_index, label_smoothing, reduction);
}

}  // namespace CPU_CAPABILITY
}  // namespace calibkernels
