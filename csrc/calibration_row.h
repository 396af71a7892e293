// Per-sample calibration math shared by the CPU and CUDA kernels (CONTRACT §2). No torch types.
#pragma once

#include <stdint.h>

#include "focal_loss_row.h"  // CK_HD

namespace calibkernels {
CK_CAPABILITY_BEGIN

// bin(c) = #{ j in 1 .. n_bins-1 : boundaries[j] < c }, against the float32 boundaries
// torch.linspace(0, 1, n_bins + 1) (so bins are (lo, hi], and c = 0 falls in bin 0). A guess from
// c * n_bins, then a step or two against the true boundaries: identical to a full search.
template <typename T>
CK_HD int bin_index(T c, const float* boundaries, int n_bins) {
  if (!(c == c)) return 0;  // NaN (a poisoned sample): any bin, its sum turns NaN anyway
  int g = static_cast<int>(c * static_cast<T>(n_bins));
  g = g < 0 ? 0 : (g > n_bins - 1 ? n_bins - 1 : g);
  while (g > 0 && !(static_cast<T>(boundaries[g]) < c)) --g;
  while (g < n_bins - 1 && static_cast<T>(boundaries[g + 1]) < c) ++g;
  return g;
}

// ECE, MCE and RMSCE of a binned state into out[0..2], in float64, as calibkernels/calibration.py's
// binned_error: sum_b (n_b / n) |hits_b / n_b - conf_b / n_b|, its max over non-empty bins (NaN
// if a gap is NaN), the root of the weighted squares; NaN for an empty state.
CK_HD void binned_errors(const int64_t* counts, const double* conf_sums, const int64_t* hits,
                         int n_bins, double* out) {
  int64_t n = 0;
  for (int b = 0; b < n_bins; ++b) n += counts[b];
  double l1 = 0.0, l2 = 0.0, mx = -INFINITY;
  for (int b = 0; b < n_bins; ++b) {
    if (counts[b] == 0) continue;
    const double c = static_cast<double>(counts[b]);
    const double gap = fabs(static_cast<double>(hits[b]) / c - conf_sums[b] / c);
    const double w = c / static_cast<double>(n);
    l1 += w * gap;
    l2 += w * (gap * gap);
    if (mx == mx && !(gap <= mx)) mx = gap;  // a NaN gap stays, as torch's amax
  }
  out[0] = n > 0 ? l1 : NAN;
  out[1] = n > 0 ? mx : NAN;
  out[2] = n > 0 ? sqrt(l2) : NAN;
}

CK_CAPABILITY_END
}  // namespace calibkernels
