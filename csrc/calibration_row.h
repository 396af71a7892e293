// Per-sample calibration math shared by the CPU and CUDA kernels (CONTRACT §2). No torch types.
#pragma once

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

CK_CAPABILITY_END
}  // namespace calibkernels
