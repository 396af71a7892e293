// Fused calibration state on the CPU: one parallel pass over the rows (softmax statistics,
// confidence, prediction), a serial pass over N in row order for the top-label bins, and for the
// classwise state a pass parallel over classes that visits the rows in order. Every sum has a fixed
// order, so the result is bitwise identical for any thread count.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "calibration_row.h"
#include "cpu_exp.h"
#include "cpu_parallel.h"
#include "ops.h"

namespace calibkernels {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor>;

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

template <typename scalar_t>
void calibration_cpu_kernel(const at::Tensor& input, const int64_t* target, const float* beta,
                            int n_bins, bool from_logits, int64_t ignore_index, bool classwise,
                            at::Tensor& counts, at::Tensor& conf_sums, at::Tensor& hits,
                            at::Tensor& cw_counts, at::Tensor& cw_conf_sums, at::Tensor& cw_hits,
                            at::Tensor& confidence, at::Tensor& correct) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  const int64_t N = input.size(0), C = input.size(1);
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  acc_t* conf = confidence.mutable_data_ptr<acc_t>();
  bool* hit = correct.mutable_data_ptr<bool>();
  // Softmax statistics per row (max, sum of exp), kept for the classwise pass.
  std::vector<acc_t> row_max(classwise && from_logits ? N : 0);
  std::vector<acc_t> row_sum(classwise && from_logits ? N : 0);

  // Pass 1, rows in parallel: confidence, prediction (lowest index on ties, as torch.argmax).
  parallel_rows(N, C, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(kReduced ? C : 0);
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* row;
      if constexpr (kReduced) {
        at::vec::convert(x + i * C, buf.data(), C);
        row = buf.data();
      } else {
        row = x + i * C;
      }
      const acc_t m = at::vec::reduce_all<acc_t>(
          [](const Vec& u, const Vec& v) { return at::vec::maximum(u, v); }, row, C);
      const int64_t pred = first_index_of(row, m, C);
      acc_t c = m;
      if (from_logits) {
        const acc_t s = at::vec::map_reduce_all<acc_t>(
            [m](const Vec& v) { return vexp(v - Vec(m)); },
            [](const Vec& u, const Vec& v) { return u + v; }, row, C);
        c = acc_t(1) / s;  // the top probability, exp(m - m) / s
        if (!row_sum.empty()) {
          row_max[i] = m;
          row_sum[i] = s;
        }
      }
      conf[i] = c;
      hit[i] = pred == target[i];
    }
  });

  // Pass 2, rows in order: the top-label bins.
  int64_t* cnt = counts.mutable_data_ptr<int64_t>();
  double* csum = conf_sums.mutable_data_ptr<double>();
  int64_t* hsum = hits.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    if (target[i] == ignore_index) continue;
    const int b = bin_index(conf[i], beta, n_bins);
    cnt[b] += 1;
    csum[b] += static_cast<double>(conf[i]);
    hsum[b] += hit[i] ? 1 : 0;
  }
  if (!classwise) return;

  // Pass 3, classes in parallel, each visiting the rows in order: p_ik into class k's bins.
  int64_t* wcnt = cw_counts.mutable_data_ptr<int64_t>();
  double* wsum = cw_conf_sums.mutable_data_ptr<double>();
  int64_t* whit = cw_hits.mutable_data_ptr<int64_t>();
  at::parallel_for(0, C, /*grain_size=*/16, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> p(k1 - k0);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t y = target[i];
      if (y == ignore_index) continue;
      for (int64_t k = k0; k < k1; ++k) p[k - k0] = static_cast<acc_t>(x[i * C + k]);
      if (from_logits) {
        const acc_t m = row_max[i], inv_s = acc_t(1) / row_sum[i];
        at::vec::map([m, inv_s](const Vec& v) { return vexp(v - Vec(m)) * Vec(inv_s); },
                     p.data(), p.data(), k1 - k0);
      }
      for (int64_t k = k0; k < k1; ++k) {
        const acc_t pk = p[k - k0];
        const int64_t slot = k * n_bins + bin_index(pk, beta, n_bins);
        wcnt[slot] += 1;
        wsum[slot] += static_cast<double>(pk);
        whit[slot] += y == k ? 1 : 0;
      }
    }
  });
}

Outputs calibration_bins_cpu(const at::Tensor& input, const at::Tensor& target,
                             const at::Tensor& boundaries, bool from_logits, int64_t ignore_index,
                             bool classwise, bool per_sample) {
  check_calibration_args(input, target, boundaries);
  const at::Tensor x = input.contiguous();
  const at::Tensor t = target.contiguous();
  const at::Tensor beta = boundaries.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const int n_bins = static_cast<int>(beta.size(0) - 1);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::TensorOptions i64 = x.options().dtype(at::kLong), f64 = x.options().dtype(at::kDouble);

  const int64_t* tp = t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_INDEX(tp[i] == ignore_index || (tp[i] >= 0 && tp[i] < C), "calibration: target ",
                      tp[i], " at position ", i, " is out of range for ", C,
                      " classes (and is not ignore_index=", ignore_index, ")");
  }
  if (!from_logits && x.numel() > 0) {
    const at::Tensor bad = (x < 0) | (x > 1) | x.isnan();
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), "calibration: with from_logits=False the input "
                      "must hold probabilities in [0, 1]; found ",
                      x.masked_select(bad)[0].item<double>());
  }

  at::Tensor counts = at::zeros({n_bins}, i64), conf_sums = at::zeros({n_bins}, f64),
             hits = at::zeros({n_bins}, i64);
  at::Tensor cw_counts = at::zeros({classwise ? C : 0, n_bins}, i64),
             cw_conf_sums = at::zeros({classwise ? C : 0, n_bins}, f64),
             cw_hits = at::zeros({classwise ? C : 0, n_bins}, i64);
  at::Tensor confidence = at::empty({N}, x.options().dtype(acc_type));
  at::Tensor correct = at::empty({N}, x.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "calibration_cpu",
                                  [&] {
    calibration_cpu_kernel<scalar_t>(x, tp, beta.const_data_ptr<float>(), n_bins, from_logits,
                                     ignore_index, classwise, counts, conf_sums, hits, cw_counts,
                                     cw_conf_sums, cw_hits, confidence, correct);
  });
  if (!per_sample) {
    confidence = at::empty({0}, confidence.options());
    correct = at::empty({0}, correct.options());
  }
  return {counts, conf_sums, hits, cw_counts, cw_conf_sums, cw_hits, confidence, correct};
}

}  // namespace

TORCH_LIBRARY_IMPL(calibkernels, CPU, m) { m.impl("calibration_bins", &calibration_bins_cpu); }

}  // namespace calibkernels
