// The CUDA focal-loss launcher: raw pointers and sizes only, so the .cu files never include torch
// headers and compile in seconds (ENVIRONMENT.md).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../focal_loss_row.h"
#include "dtype.h"

namespace calibkernels {

enum class ReductionKind : int { None, Mean, Sum };

struct FocalLossLaunch {
  DType dtype;
  const void* logits;     // (n_rows, n_classes), contiguous, dtype
  const int64_t* target;  // (n_rows)
  const void* weight;     // (n_classes) in the math type (float, or double for Float64); or null
  int64_t n_rows, n_classes, ignore_index;
  GammaSchedule schedule;
  double smoothing;
  ReductionKind reduction;
  bool vectorized;  // every row starts 16-byte aligned: n_classes * size % 16 == 0, aligned bases
  void* loss_rows;  // (n_rows) in the math type: per-row loss
  void* loss;       // () in the math type: the reduced loss (unused for ReductionKind::None)
  void* grad;       // (n_rows, n_classes) in dtype, or null
  double* divisor;  // () workspace: the mean's divisor, sum of w_y over non-ignored samples
};

// Enqueues the kernels on `stream`; returns the launch status (no host synchronisation).
cudaError_t launch_focal_loss(const FocalLossLaunch& args, cudaStream_t stream);

}  // namespace calibkernels
