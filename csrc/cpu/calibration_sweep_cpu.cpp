// The temperature sweep on the CPU (CONTRACT §2): ECE state and NLL of softmax(logits / T) for K
// temperatures from one read of the logits. Blocks of rows: the rows of a block in parallel form
// each sample's confidence and NLL at every T (the row stays in L1 for its K exp passes), then
// one thread bins them in row order: the same bits for any thread count.
#include <ATen/OpMathType.h>

#include <algorithm>
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

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename scalar_t>
void sweep_cpu(const scalar_t* x, const int64_t* target, const double* temps, int64_t K,
               const float* beta, int n_bins, int64_t N, int64_t C, int64_t ignore_index,
               int64_t* counts, double* conf_sums, int64_t* hits, double* nll) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  const int64_t block = std::max<int64_t>(1, 4096 / K);
  std::vector<acc_t> conf(block * K), loss(block * K);
  std::vector<uint8_t> hit(block);
  for (int64_t b0 = 0; b0 < N; b0 += block) {
    const int64_t b1 = std::min(N, b0 + block);
    parallel_rows(b1 - b0, C * K, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(kReduced ? C : 0);
      for (int64_t j = begin; j < end; ++j) {
        const int64_t i = b0 + j, y = target[i];
        if (y == ignore_index) continue;
        const acc_t* row = row_in_math(x + i * C, buf.data(), C);
        const acc_t m = row_max(row, C);
        hit[j] = first_index_of(row, m, C) == y;  // the same prediction at every T > 0
        for (int64_t k = 0; k < K; ++k) {
          const acc_t inv_t = static_cast<acc_t>(1.0 / temps[k]);
          // sum of exp((x - m) / T) without the true class, so that log1p keeps p_y -> 1 exact
          const auto e = [m, inv_t](const Vec& v) { return vexp((v - Vec(m)) * Vec(inv_t)); };
          const acc_t other = sum_range(row, 0, y, e) + sum_range(row, y + 1, C, e);
          const acc_t z_y = (row[y] - m) * inv_t;
          const acc_t s = other + std::exp(z_y);
          conf[j * K + k] = acc_t(1) / s;
          loss[j * K + k] = z_y == acc_t(0) ? std::log1p(other) : std::log(s) - z_y;  // inf: NaN
        }
      }
    });
    for (int64_t i = b0; i < b1; ++i) {  // rows in order: a fixed order for every sum
      if (target[i] == ignore_index) continue;
      const int64_t j = i - b0;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t c = conf[j * K + k];
        const int64_t slot = k * n_bins + bin_index(c, beta, n_bins);
        counts[slot] += 1;
        conf_sums[slot] += static_cast<double>(c);
        hits[slot] += hit[j] && c == c;  // a NaN confidence is never correct
        nll[k] += static_cast<double>(loss[j * K + k]);
      }
    }
  }
}

Outputs calibration_sweep_cpu(const at::Tensor& logits, const at::Tensor& target,
                              const at::Tensor& temperatures, const at::Tensor& boundaries,
                              int64_t ignore_index) {
  check_sweep_args(logits, target, temperatures, boundaries);
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = target.to(at::kLong).contiguous();
  const at::Tensor temps = temperatures.contiguous();
  const at::Tensor beta = boundaries.contiguous();
  const int64_t N = x.size(0), C = x.size(1), K = temps.numel();
  const int n_bins = static_cast<int>(beta.size(0) - 1);
  const int64_t* tp = t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_INDEX(tp[i] == ignore_index || (tp[i] >= 0 && tp[i] < C),
                      "calibration_sweep: target ", tp[i], " at position ", i,
                      " is out of range for ", C, " classes (and is not ignore_index=",
                      ignore_index, ")");
  }
  const at::TensorOptions i64 = x.options().dtype(at::kLong), f64 = x.options().dtype(at::kDouble);
  at::Tensor counts = at::zeros({K, n_bins}, i64), conf_sums = at::zeros({K, n_bins}, f64),
             hits = at::zeros({K, n_bins}, i64), nll = at::zeros({K}, f64);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "calibration_sweep",
                                  [&] {
    sweep_cpu<scalar_t>(x.const_data_ptr<scalar_t>(), tp, temps.const_data_ptr<double>(), K,
                        beta.const_data_ptr<float>(), n_bins, N, C, ignore_index,
                        counts.mutable_data_ptr<int64_t>(), conf_sums.mutable_data_ptr<double>(),
                        hits.mutable_data_ptr<int64_t>(), nll.mutable_data_ptr<double>());
  });
  return {counts, conf_sums, hits, nll};
}

}  // namespace

// This instruction set's entry point (kernels.h); csrc/cpu_dispatch.cpp picks one at run time.
SweepOutputs calibration_sweep(const at::Tensor& logits, const at::Tensor& target,
                               const at::Tensor& temperatures, const at::Tensor& boundaries,
                               int64_t ignore_index) {
  return calibration_sweep_cpu(logits, target, temperatures, boundaries, ignore_index);
}

}  // namespace CPU_CAPABILITY
}  // namespace calibkernels
