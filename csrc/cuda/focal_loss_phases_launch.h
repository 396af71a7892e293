// The CUDA launchers of the focal loss's phases over a window of classes (raw pointers only).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../focal_loss_row.h"
#include "dtype.h"

namespace calibkernels {

struct FocalPhasesLaunch {
  DType dtype;            // the window's storage type
  const void* input;      // (n_rows, width), contiguous; null for finish
  const int64_t* target;  // (n_rows) global class indices
  int64_t n_rows, width, class_offset, n_classes, ignore_index;
  GammaSchedule schedule;
  double smoothing;
  const void* row_stats;  // (n_rows, 4) math type: combined [max, n_max, rest, x_y]
  const void* sums;       // (n_rows, 2) math type, or null (finish without smoothing)
  const void* stats;      // (n_rows, kRowStats) math type (window_grad)
  const void* grad_output;  // math type: (n_rows) when per_row, else one value
  bool per_row;
  const double* divisor;  // () the mean's divisor on the device, or null: scale 1
  void* out;              // partial_stats (n_rows, 4); partial_sums (n_rows, 2); finish: loss
                          // rows (n_rows); window_grad: (n_rows, width) in dtype
  void* out_stats;        // finish: (n_rows, kRowStats)
};

cudaError_t launch_focal_partial_stats(const FocalPhasesLaunch& p, cudaStream_t stream);
cudaError_t launch_focal_partial_sums(const FocalPhasesLaunch& p, cudaStream_t stream);
cudaError_t launch_focal_finish(const FocalPhasesLaunch& p, cudaStream_t stream);
cudaError_t launch_focal_window_grad(const FocalPhasesLaunch& p, cudaStream_t stream);

}  // namespace calibkernels
