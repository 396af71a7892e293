// The CUDA focal-loss launchers: raw pointers and sizes only, so the .cu files never include torch
// headers and compile in seconds (ENVIRONMENT.md).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../focal_loss_row.h"
#include "dtype.h"

namespace calibkernels {

enum class ReductionKind : int { None, Mean, Sum };

// The mean's divisor is summed by this many blocks of the prepare kernel; every reader adds the
// parts in one order (the same bits in every block).
constexpr int kDivisorParts = 64;

struct FocalLossLaunch {
  DType dtype;            // the input's storage type
  DType target_dtype;     // probability targets: the input's dtype or its math type
  DType out_dtype;        // the loss's dtype
  const void* logits;     // (n_rows, n_classes), contiguous, dtype
  const int64_t* target;  // class indices (n_rows), or null
  const void* probs;      // class probabilities (n_rows, n_classes), target_dtype, or null
  const void* weight;     // (n_classes) in the math type (float, or double for Float64); or null
  int64_t n_rows, n_classes, ignore_index;
  GammaSchedule schedule;  // from a CPU table, or:
  const double* table;     // a table on the device (2 schedule.n + 1 values), read there; or null
  double smoothing;
  ReductionKind reduction;
  bool vectorized;  // every row starts 16-byte aligned: n_classes * size % 16 == 0, aligned bases
  bool bases_aligned;  // logits (and grad, where written) start 16-byte aligned; rows need not
  // forward
  void* loss;       // out_dtype: (n_rows) for ReductionKind::None, else ()
  void* grad;       // (n_rows, n_classes) in dtype, or null
  void* stats;      // (n_rows, kRowStats) in the math type, or null
  double* divisor_parts;  // (kDivisorParts) workspace: the mean's divisor (the sum of w_y over
                          // non-ignored samples, or N) in parts, summed by mean_divisor
  double* partials;       // (row blocks) workspace: per-block loss sums, summed in block order
  unsigned int* ticket;   // () workspace: blocks done (the prepare kernel zeroes it)
  // backward (the gradient phase): grad = grad_output x d loss / d input, into `grad`
  const void* grad_output;  // go_dtype: (n_rows) for ReductionKind::None, else one value
  DType go_dtype;
  int64_t go_stride;        // between rows' values (0 when expanded)
  bool skip_one;            // `grad` holds the forward's gradient: rows whose grad_output is 1
                            // are left as they are (decided on the device)
};

// The row blocks of the forward kernel (the size of the partials workspace).
int64_t focal_loss_row_blocks(const FocalLossLaunch& p);

// The class-index fast path (focal_loss_sparse_kernels.cu): its row blocks, 0 where it does not
// take the launch; and its forward row kernel, false (nothing enqueued) where it does not.
int64_t focal_loss_sparse_blocks(const FocalLossLaunch& p);
bool launch_focal_loss_sparse_forward(const FocalLossLaunch& p, cudaStream_t stream,
                                      cudaError_t* err);

// Enqueue the kernels on `stream`; return the launch status (no host synchronisation).
cudaError_t launch_focal_loss_forward(const FocalLossLaunch& p, cudaStream_t stream);
cudaError_t launch_focal_loss_backward(const FocalLossLaunch& p, cudaStream_t stream);

}  // namespace calibkernels
