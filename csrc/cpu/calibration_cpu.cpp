// Fused calibration state on the CPU (CONTRACT §2), from one read of the input. Rows go in blocks
// of a few MiB: (A) the rows of a block in parallel give each sample's confidence, prediction,
// Brier and NLL terms; (B) one thread adds them into the top-label bins in row order; (C) with
// classwise, the classes in parallel bin the block's p_ik, row by row, while the block is still in
// cache. Every sum has a fixed order: bitwise the same result for any thread count.
//
// Logits or probabilities (mode): with kAuto both readings are formed until a value outside
// [0, 1] shows the input to be logits (torchmetrics' rule: probabilities when every value lies in
// [0, 1]); the one that holds is returned.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "../calibration_row.h"
#include "cpu_exp.h"
#include "cpu_parallel.h"
#include "cpu_rows.h"
#include "../ops.h"
#include "kernels.h"

namespace calibkernels {
namespace CPU_CAPABILITY {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor>;

// One sample under one reading of the input (softmax of logits, or the values as probabilities).
template <typename acc_t>
struct Sample {
  acc_t conf, brier, nll;
};

// The binned state of one reading.
struct State {
  std::vector<int64_t> counts, hits, cw_counts, cw_hits;
  std::vector<double> conf_sums, cw_conf_sums;
  double brier = 0.0, nll = 0.0;

  State(int n_bins, int64_t cw_slots)
      : counts(n_bins), hits(n_bins), cw_counts(cw_slots), cw_hits(cw_slots), conf_sums(n_bins),
        cw_conf_sums(cw_slots) {}
};

// The softmax reading of row x (e: a scratch row): confidence 1 / s, Brier
// sum_{k != y} p_k^2 + (1 - p_y)^2 and NLL -log p_y, formed from sums that leave out the true
// class, so that nothing cancels when p_y -> 1.
template <typename acc_t>
Sample<acc_t> softmax_sample(const acc_t* x, acc_t m, int64_t y, acc_t* e, int64_t C) {
  using Vec = at::vec::Vectorized<acc_t>;
  at::vec::map([m](const Vec& v) { return vexp(v - Vec(m)); }, e, x, C);
  const auto id = [](const Vec& v) { return v; };
  const auto sq = [](const Vec& v) { return v * v; };
  const acc_t other = sum_range(e, 0, y, id) + sum_range(e, y + 1, C, id);
  const acc_t other2 = sum_range(e, 0, y, sq) + sum_range(e, y + 1, C, sq);
  const acc_t s = other + e[y];
  Sample<acc_t> out;
  out.conf = acc_t(1) / s;
  out.brier = (other2 + other * other) / (s * s);
  // log s - (x_y - m): log1p(other) when y holds the max, where s = 1 + other (z_y, not x_y == m:
  // a +inf target logit gives inf - inf = NaN, as on the GPU, not an NLL of 0)
  const acc_t z_y = x[y] - m;
  out.nll = z_y == acc_t(0) ? std::log1p(other) : std::log(s) - z_y;
  return out;
}

// The probability reading of row x: the top value, sum_{k != y} x_k^2 + (1 - x_y)^2, -log x_y.
template <typename acc_t>
Sample<acc_t> probability_sample(const acc_t* x, acc_t m, int64_t y, int64_t C) {
  using Vec = at::vec::Vectorized<acc_t>;
  const auto sq = [](const Vec& v) { return v * v; };
  const acc_t other2 = sum_range(x, 0, y, sq) + sum_range(x, y + 1, C, sq);
  const acc_t q = acc_t(1) - x[y];
  return {m, other2 + q * q, -std::log(x[y])};
}

// Whether every value of the row lies in [0, 1] (NaN does not).
template <typename acc_t>
bool in_unit_interval(const acc_t* x, int64_t C) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t k = 0;
  for (; k + V <= C; k += V) {
    const Vec v = Vec::loadu(x + k);
    if (((v >= Vec(acc_t(0))) & (v <= Vec(acc_t(1)))).zero_mask() != 0) return false;
  }
  for (; k < C; ++k) {
    if (!(x[k] >= acc_t(0) && x[k] <= acc_t(1))) return false;
  }
  return true;
}

template <typename scalar_t>
struct CalibrationCpu {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;

  const scalar_t* x;
  const int64_t* target;
  const float* beta;
  int n_bins;
  int64_t N, C, ignore_index;
  bool classwise;
  bool logits_live, probs_live;  // the readings still formed
  State logits, probs;
  std::vector<acc_t> conf_l, conf_p;  // per sample, for AdaECE
  std::vector<uint8_t> correct;

  // Pass A over rows [b0, b1): each sample's readings; returns whether every value lay in [0, 1].
  bool rows(int64_t b0, int64_t b1, std::vector<Sample<acc_t>>& sl, std::vector<Sample<acc_t>>& sp,
            std::vector<acc_t>& row_m) {
    std::atomic<bool> unit{true};
    parallel_rows(b1 - b0, C, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(kReduced ? C : 0), e(C);
      bool all_unit = true;
      for (int64_t j = begin; j < end; ++j) {
        const int64_t i = b0 + j;
        const acc_t* row = row_in_math(x + i * C, buf.data(), C);
        const acc_t m = row_max(row, C);
        row_m[j] = m;
        correct[i] = first_index_of(row, m, C) == target[i];
        if (target[i] == ignore_index) continue;  // (not read for the rule either: torchmetrics')
        if (probs_live) all_unit = all_unit && in_unit_interval(row, C);
        const int64_t y = target[i];
        if (logits_live) sl[j] = softmax_sample(row, m, y, e.data(), C);
        // a NaN confidence (a NaN or +inf logit) is never correct: one rule at every width and on
        // every backend, where the row max may drop a NaN or keep it
        if (logits_live && !(sl[j].conf == sl[j].conf)) correct[i] = 0;
        if (probs_live) sp[j] = probability_sample(row, m, y, C);
      }
      if (!all_unit) unit.store(false, std::memory_order_relaxed);
    });
    return unit.load();
  }

  // Pass B: the top-label bins, Brier and NLL of rows [b0, b1), in row order.
  void top_label(State& st, std::vector<acc_t>& conf, const std::vector<Sample<acc_t>>& samples,
                 int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      if (target[i] == ignore_index) {
        conf[i] = acc_t(0);
        continue;
      }
      const Sample<acc_t>& s = samples[i - b0];
      conf[i] = s.conf;
      const int b = bin_index(s.conf, beta, n_bins);
      st.counts[b] += 1;
      st.conf_sums[b] += static_cast<double>(s.conf);
      st.hits[b] += correct[i];
      st.brier += static_cast<double>(s.brier);
      st.nll += static_cast<double>(s.nll);
    }
  }

  // Pass C: classes in parallel, each visiting the rows [b0, b1) in order: p_ik into class k's
  // bins (p = exp(x - m) / s for logits, x for probabilities).
  void classwise_bins(State& st, bool softmax, int64_t b0, int64_t b1,
                      const std::vector<acc_t>& row_m, const std::vector<Sample<acc_t>>& samples) {
    using Vec = at::vec::Vectorized<acc_t>;
    at::parallel_for(0, C, /*grain_size=*/16, [&](int64_t k0, int64_t k1) {
      std::vector<acc_t> p(k1 - k0);
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t y = target[i];
        if (y == ignore_index) continue;
        for (int64_t k = k0; k < k1; ++k) p[k - k0] = static_cast<acc_t>(x[i * C + k]);
        if (softmax) {
          const acc_t m = row_m[i - b0], inv_s = samples[i - b0].conf;  // 1 / s
          at::vec::map([m, inv_s](const Vec& v) { return vexp(v - Vec(m)) * Vec(inv_s); },
                       p.data(), p.data(), k1 - k0);
        }
        for (int64_t k = k0; k < k1; ++k) {
          const acc_t pk = p[k - k0];
          const int64_t slot = k * n_bins + bin_index(pk, beta, n_bins);
          st.cw_counts[slot] += 1;
          st.cw_conf_sums[slot] += static_cast<double>(pk);
          st.cw_hits[slot] += y == k ? 1 : 0;
        }
      }
    });
  }

  void run() {
    // Blocks small enough to stay in cache between passes A and C (classwise), else large.
    const int64_t block_bytes = classwise ? (int64_t(2) << 20) : (int64_t(64) << 20);
    const int64_t block = std::max<int64_t>(1, block_bytes / std::max<int64_t>(1, C * sizeof(scalar_t)));
    std::vector<Sample<acc_t>> sl(std::min(block, N)), sp(std::min(block, N));
    std::vector<acc_t> row_m(std::min(block, N));
    for (int64_t b0 = 0; b0 < N; b0 += block) {
      const int64_t b1 = std::min(N, b0 + block);
      const bool unit = rows(b0, b1, sl, sp, row_m);
      if (!unit) probs_live = false;  // a value outside [0, 1]: logits
      if (logits_live) top_label(logits, conf_l, sl, b0, b1);
      if (probs_live) top_label(probs, conf_p, sp, b0, b1);
      if (classwise && logits_live) classwise_bins(logits, true, b0, b1, row_m, sl);
      if (classwise && probs_live) classwise_bins(probs, false, b0, b1, row_m, sp);
    }
  }
};

template <typename T>
at::Tensor to_tensor(const std::vector<T>& v, at::IntArrayRef shape, const at::TensorOptions& o) {
  return at::from_blob(const_cast<T*>(v.data()), shape, o.device(at::kCPU)).clone();
}

Outputs calibration_bins_cpu(const at::Tensor& input, const at::Tensor& target,
                             const at::Tensor& boundaries, int64_t mode, int64_t ignore_index,
                             bool classwise, bool per_sample) {
  check_calibration_args(input, target, boundaries, mode);
  const at::Tensor x = input.contiguous();
  const at::Tensor t = target.to(at::kLong).contiguous();
  const at::Tensor beta = boundaries.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const int n_bins = static_cast<int>(beta.size(0) - 1);
  const auto acc_type = math_type(x.scalar_type());
  const at::TensorOptions i64 = x.options().dtype(at::kLong), f64 = x.options().dtype(at::kDouble);

  const int64_t* tp = t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_INDEX(tp[i] == ignore_index || (tp[i] >= 0 && tp[i] < C), "calibration: target ",
                      tp[i], " at position ", i, " is out of range for ", C,
                      " classes (and is not ignore_index=", ignore_index, ")");
  }
  if (mode == kProbabilities && x.numel() > 0) {
    const at::Tensor kept = x.index({t != ignore_index});  // ignored samples are not read
    const at::Tensor bad = (kept < 0) | (kept > 1) | kept.isnan();
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), "calibration: with from_logits=False the input "
                      "must hold probabilities in [0, 1]; found ",
                      kept.masked_select(bad)[0].item<double>());
  }
  const int64_t cw_slots = classwise ? C * n_bins : 0;
  Outputs out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "calibration_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    CalibrationCpu<scalar_t> k{x.const_data_ptr<scalar_t>(), tp, beta.const_data_ptr<float>(),
                               n_bins, N, C, ignore_index, classwise,
                               /*logits_live=*/mode != kProbabilities,
                               /*probs_live=*/mode != kLogits,
                               State(n_bins, cw_slots), State(n_bins, cw_slots),
                               std::vector<acc_t>(N), std::vector<acc_t>(N),
                               std::vector<uint8_t>(N)};
    k.run();
    const bool probabilities = k.probs_live;  // kAuto: every value lay in [0, 1]
    const State& st = probabilities ? k.probs : k.logits;
    const std::vector<acc_t>& conf = probabilities ? k.conf_p : k.conf_l;
    const at::TensorOptions acc = x.options().dtype(acc_type);
    std::vector<double> totals{st.brier, st.nll, probabilities ? 1.0 : 0.0, 0.0, 0.0, 0.0};
    binned_errors(st.counts.data(), st.conf_sums.data(), st.hits.data(), n_bins, &totals[3]);
    at::Tensor correct = at::empty({N}, x.options().dtype(at::kBool));
    bool* correct_out = correct.mutable_data_ptr<bool>();
    for (int64_t i = 0; i < N; ++i) {  // an ignored row is not correct (its target may be a class)
      correct_out[i] = k.correct[i] && tp[i] != ignore_index;
    }
    out = {to_tensor(st.counts, {n_bins}, i64), to_tensor(st.conf_sums, {n_bins}, f64),
           to_tensor(st.hits, {n_bins}, i64),
           to_tensor(st.cw_counts, {classwise ? C : 0, n_bins}, i64),
           to_tensor(st.cw_conf_sums, {classwise ? C : 0, n_bins}, f64),
           to_tensor(st.cw_hits, {classwise ? C : 0, n_bins}, i64),
           per_sample ? to_tensor(conf, {N}, acc) : at::empty({0}, acc),
           per_sample ? correct : at::empty({0}, correct.options()),
           to_tensor(totals, {6}, f64)};
  });
  return out;
}

}  // namespace

// This instruction set's entry point (kernels.h); csrc/cpu_dispatch.cpp picks one at run time.
CalibrationOutputs calibration_bins(const at::Tensor& input, const at::Tensor& target,
                                    const at::Tensor& boundaries, int64_t mode,
                                    int64_t ignore_index, bool classwise, bool per_sample) {
  return calibration_bins_cpu(input, target, boundaries, mode, ignore_index, classwise,
                              per_sample);
}

}  // namespace CPU_CAPABILITY
}  // namespace calibkernels
