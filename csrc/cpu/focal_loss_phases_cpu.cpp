// The focal loss's phases over a window of each row's classes, on the CPU: the row split across
// processes (vocabulary-parallel training) or computed piece by piece. The window holds columns
// [class_offset, class_offset + C_w) of n_classes; each phase reads it once:
//   partial_stats  max, #equal to it, sum of exp(x - max) over the rest, the target's logit
//   partial_sums   with label smoothing: sums over the window of (eps / C) f_k and (eps / C) G_k
//   finish         from the combined statistics: each row's loss and RowStats (its epilogue)
//   window_grad    the window's gradient from the RowStats, grad_output applied
// The math is the whole-row kernels' (focal_loss_rows.h, ../focal_loss_row.h), so a row split
// into windows gives the numbers of the unsplit row up to the order of its sums.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../ops.h"
#include "cpu_parallel.h"
#include "cpu_rows.h"
#include "focal_loss_rows.h"
#include "kernels.h"

namespace calibkernels {
namespace CPU_CAPABILITY {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

void check_window(const at::Tensor& input, const at::Tensor& target, int64_t class_offset,
                  int64_t n_classes, const char* what) {
  TORCH_CHECK_VALUE(input.dim() == 2 && at::isFloatingType(input.scalar_type()), what,
                    ": input must be a 2-D (N, C_window) floating tensor, got ",
                    input.scalar_type(), " of shape ", input.sizes());
  TORCH_CHECK_VALUE((target.scalar_type() == at::kLong || target.scalar_type() == at::kByte) &&
                        target.dim() == 1 && target.size(0) == input.size(0),
                    what, ": target must hold class indices (int64 or uint8) of shape (",
                    input.size(0), ")");
  TORCH_CHECK_VALUE(class_offset >= 0 && (n_classes < 0 || class_offset + input.size(1) <= n_classes),
                    what, ": the window [", class_offset, ", ", class_offset + input.size(1),
                    ") must lie in [0, ", n_classes, ")");
}

// The combined statistics of a row: log sum exp and the target's log-probability.
template <typename acc_t>
struct RowGlobals {
  acc_t m, n_max, rest, x_y;
  acc_t s() const { return n_max + rest; }
  acc_t log_s() const { return log_sum_exp_shifted(n_max, rest); }
};

template <typename acc_t>
RowGlobals<acc_t> globals_of(const acc_t* g, int64_t i) {
  return {g[i * 4], g[i * 4 + 1], g[i * 4 + 2], g[i * 4 + 3]};
}

at::Tensor partial_stats(const at::Tensor& input, const at::Tensor& target, int64_t class_offset,
                         int64_t ignore_index) {
  check_window(input, target, class_offset, -1, "focal_loss_partial_stats");
  const at::Tensor x = input.contiguous(), t = target.to(at::kLong).contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor out = at::empty({N, 4}, x.options().dtype(math_type(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "partial_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t* tp = t.const_data_ptr<int64_t>();
    acc_t* o = out.mutable_data_ptr<acc_t>();
    parallel_rows(N, C, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : C);
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* row = row_in_math(xp + i * C, buf.data(), C);
        const acc_t m = C > 0 ? row_max(row, C) : static_cast<acc_t>(kNegInf);
        const auto [n_max, rest] = exp_sum_split(row, m, static_cast<acc_t*>(nullptr), C);
        const int64_t y = tp[i] - class_offset;
        o[i * 4] = m;
        o[i * 4 + 1] = n_max;
        o[i * 4 + 2] = rest;
        o[i * 4 + 3] = tp[i] != ignore_index && y >= 0 && y < C ? row[y]
                                                                 : static_cast<acc_t>(kNegInf);
      }
    });
  });
  return out;
}

at::Tensor partial_sums(const at::Tensor& input, const at::Tensor& target, const at::Tensor& gamma,
                        const at::Tensor& row_stats, int64_t class_offset, int64_t n_classes,
                        int64_t ignore_index, double label_smoothing) {
  check_window(input, target, class_offset, n_classes, "focal_loss_partial_sums");
  const GammaSchedule schedule = cpu_gamma_schedule(gamma);
  const at::Tensor x = input.contiguous(), t = target.to(at::kLong).contiguous();
  const at::Tensor g = row_stats.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK_VALUE(g.dim() == 2 && g.size(0) == N && g.size(1) == 4 &&
                        g.scalar_type() == math_type(x.scalar_type()),
                    "focal_loss_partial_sums: row_stats must be the combined (N, 4) statistics");
  at::Tensor out = at::empty({N, 2}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "partial_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t* tp = t.const_data_ptr<int64_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    acc_t* op = out.mutable_data_ptr<acc_t>();
    const acc_t b = static_cast<acc_t>(label_smoothing / static_cast<double>(n_classes));
    parallel_rows(N, C, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : C);
      for (int64_t i = begin; i < end; ++i) {
        op[i * 2] = op[i * 2 + 1] = acc_t(0);
        if (tp[i] == ignore_index) continue;
        const RowGlobals<acc_t> r = globals_of(gp, i);
        const acc_t log_s = r.log_s();
        const acc_t gam = select_gamma(schedule, std::exp((r.x_y - r.m) - log_s));
        const acc_t* row = row_in_math(xp + i * C, buf.data(), C);
        double sum_af = 0.0, sum_aG = 0.0;  // serial sums of C terms: in double
        for (int64_t k = 0; k < C; ++k) {
          const FocalTerms<acc_t> tk = focal_terms((row[k] - r.m) - log_s, gam);
          sum_af += static_cast<double>(b * tk.f);
          if (k + class_offset != tp[i]) sum_aG += static_cast<double>(b * tk.G);
        }
        op[i * 2] = static_cast<acc_t>(sum_af);
        op[i * 2 + 1] = static_cast<acc_t>(sum_aG);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> finish(const at::Tensor& row_stats, const at::Tensor& sums,
                                          const at::Tensor& target, const at::Tensor& gamma,
                                          int64_t n_classes, int64_t ignore_index,
                                          double label_smoothing, c10::string_view reduction) {
  const at::Tensor g = row_stats.contiguous(), t = target.to(at::kLong).contiguous();
  const int64_t N = g.size(0);
  TORCH_CHECK_VALUE(g.dim() == 2 && g.size(1) == 4 && at::isFloatingType(g.scalar_type()),
                    "focal_loss_finish: row_stats must be the combined (N, 4) statistics");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == N, "focal_loss_finish: target must have shape (",
                    N, ")");
  TORCH_CHECK_VALUE(sums.numel() == 0 || (sums.dim() == 2 && sums.size(0) == N && sums.size(1) == 2),
                    "focal_loss_finish: sums must be (N, 2), or empty without label smoothing");
  const GammaSchedule schedule = cpu_gamma_schedule(gamma);
  const Reduction red = parse_reduction(reduction);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0 && n_classes >= 1,
                    "focal_loss_finish: label_smoothing must be in [0, 1] and n_classes >= 1");
  const int64_t* tp = t.const_data_ptr<int64_t>();
  double divisor = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    if (tp[i] == ignore_index) continue;
    TORCH_CHECK_INDEX(tp[i] >= 0 && tp[i] < n_classes, "focal_loss: target ", tp[i],
                      " at position ", i, " is out of range for ", n_classes,
                      " classes (and is not ignore_index=", ignore_index, ")");
    divisor += 1.0;
  }
  at::Tensor loss_rows = at::empty({N}, g.options());
  at::Tensor stats = at::empty({N, kRowStats}, g.options());
  const at::Tensor sm = sums.numel() ? sums.to(g.scalar_type()).contiguous() : sums;
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "finish", [&] {
    using acc_t = scalar_t;
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const acc_t* sp = sm.numel() ? sm.const_data_ptr<acc_t>() : nullptr;
    acc_t* lp = loss_rows.mutable_data_ptr<acc_t>();
    acc_t* st = stats.mutable_data_ptr<acc_t>();
    const acc_t eps = static_cast<acc_t>(label_smoothing), c1 = acc_t(1) - eps;
    const acc_t b = static_cast<acc_t>(label_smoothing / static_cast<double>(n_classes));
    const acc_t scale = red == Reduction::Mean ? static_cast<acc_t>(1.0 / divisor) : acc_t(1);
    for (int64_t i = 0; i < N; ++i) {
      RowStats<acc_t> r{};
      if (tp[i] == ignore_index) {
        lp[i] = acc_t(0);
        store_stats(st, i, r);
        continue;
      }
      const RowGlobals<acc_t> gl = globals_of(gp, i);
      r.m = gl.m;
      r.s = gl.s();
      r.log_s = gl.log_s();
      const acc_t lp_y = (gl.x_y - gl.m) - r.log_s;
      const acc_t p_y = std::exp(lp_y);
      r.gamma = select_gamma(schedule, p_y);
      const FocalTerms<acc_t> ty = focal_terms(lp_y, p_y, r.gamma);
      // the one-hot part of the true class; the smoothing part of every class from the sums
      acc_t loss = c1 * ty.f + (sp ? sp[i * 2] : acc_t(0));
      const acc_t S_other = sp ? sp[i * 2 + 1] : acc_t(0);
      const acc_t aG_y = (c1 + b) * ty.G;
      r.S = S_other + aG_y;
      r.g_y = true_class_grad(ty, S_other, aG_y);
      r.scale = scale;
      if (poisoned_max(gl.m)) loss = r.S = r.g_y = std::numeric_limits<acc_t>::quiet_NaN();
      lp[i] = -loss;
      store_stats(st, i, r);
      total += static_cast<double>(lp[i]);
    }
  });
  if (red == Reduction::None) return {loss_rows, stats};
  if (red == Reduction::Mean) total /= divisor;  // 0 / 0 = NaN when all are ignored
  return {at::scalar_tensor(total, g.options()), stats};
}

at::Tensor window_grad(const at::Tensor& grad_output, const at::Tensor& input,
                       const at::Tensor& target, const at::Tensor& stats, int64_t class_offset,
                       int64_t n_classes, int64_t ignore_index, double label_smoothing,
                       c10::string_view reduction) {
  check_window(input, target, class_offset, n_classes, "focal_loss_window_grad");
  const Reduction red = parse_reduction(reduction);
  const at::Tensor x = input.contiguous(), t = target.to(at::kLong).contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const auto acc_type = math_type(x.scalar_type());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == kRowStats &&
                        stats.scalar_type() == acc_type,
                    "focal_loss_window_grad: stats must be focal_loss_finish's (N, ", kRowStats,
                    ") ", acc_type, " statistics");
  const bool per_row = red == Reduction::None;
  TORCH_CHECK_VALUE(per_row ? grad_output.numel() == N : grad_output.numel() == 1,
                    "focal_loss_window_grad: grad_output must have ", per_row ? N : 1,
                    " values, got shape ", grad_output.sizes());
  const at::Tensor go = grad_output.to(acc_type).contiguous().reshape(-1);
  const at::Tensor st = stats.contiguous();
  at::Tensor out = at::empty({N, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "window_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
    FocalLossCpuArgs<scalar_t, acc_t> a{};
    a.input = x.const_data_ptr<scalar_t>();
    a.n_rows = N;
    a.n_classes = C;
    a.class_count = n_classes;
    a.smoothing = static_cast<acc_t>(label_smoothing);
    a.grad = out.mutable_data_ptr<scalar_t>();
    const int64_t* tp = t.const_data_ptr<int64_t>();
    const acc_t* sp = st.const_data_ptr<acc_t>();
    const acc_t* gop = go.const_data_ptr<acc_t>();
    parallel_rows(N, C, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> x_buf(kReduced ? C : 0), e_buf(kReduced ? C : 0);
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* g = a.grad + i * C;
        if (tp[i] == ignore_index) {
          std::memset(static_cast<void*>(g), 0, sizeof(scalar_t) * C);
          continue;
        }
        const RowStats<acc_t> r = load_stats(sp, i);
        const acc_t* row = row_in_math(a.input + i * C, x_buf.data(), C);
        acc_t* e = kReduced ? e_buf.data() : reinterpret_cast<acc_t*>(g);
        const acc_t m = r.m;
        at::vec::map([m](const Vec& v) { return vexp(v - Vec(m)); }, e, row, C);
        const int64_t y = tp[i] - class_offset;  // the true class, if this window holds it
        grad_from_exp(a, e, row, static_cast<const acc_t*>(nullptr), y >= 0 && y < C ? y : -1,
                      r, gop[per_row ? i : 0] * r.scale, static_cast<const acc_t*>(nullptr));
        if constexpr (kReduced) at::vec::convert(e, g, C);
      }
    });
  });
  return out;
}

}  // namespace

// This instruction set's entry points (kernels.h); csrc/cpu_dispatch.cpp picks one at run time.
at::Tensor focal_loss_partial_stats(const at::Tensor& input, const at::Tensor& target,
                                   int64_t class_offset, int64_t ignore_index) {
  return partial_stats(input, target, class_offset, ignore_index);
}

at::Tensor focal_loss_partial_sums(const at::Tensor& input, const at::Tensor& target,
                                   const at::Tensor& gamma, const at::Tensor& row_stats,
                                   int64_t class_offset, int64_t n_classes, int64_t ignore_index,
                                   double label_smoothing) {
  return partial_sums(input, target, gamma, row_stats, class_offset, n_classes, ignore_index,
                      label_smoothing);
}

std::tuple<at::Tensor, at::Tensor> focal_loss_finish(const at::Tensor& row_stats,
                                                     const at::Tensor& sums,
                                                     const at::Tensor& target,
                                                     const at::Tensor& gamma, int64_t n_classes,
                                                     int64_t ignore_index, double label_smoothing,
                                                     c10::string_view reduction) {
  return finish(row_stats, sums, target, gamma, n_classes, ignore_index, label_smoothing,
                reduction);
}

at::Tensor focal_loss_window_grad(const at::Tensor& grad_output, const at::Tensor& input,
                                  const at::Tensor& target, const at::Tensor& stats,
                                  int64_t class_offset, int64_t n_classes, int64_t ignore_index,
                                  double label_smoothing, c10::string_view reduction) {
  return window_grad(grad_output, input, target, stats, class_offset, n_classes, ignore_index,
                     label_smoothing, reduction);
}

}  // namespace CPU_CAPABILITY
}  // namespace calibkernels
