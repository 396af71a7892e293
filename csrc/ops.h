// Argument checks and packing shared by every backend's op implementation.
#pragma once

#include <ATen/ATen.h>

#include "focal_loss_row.h"

namespace calibkernels {

enum class Reduction { None, Mean, Sum };

Reduction parse_reduction(c10::string_view reduction);

// The options of focal_loss_forward / focal_loss_backward, checked and unpacked.
struct FocalLossOptions {
  Reduction reduction;
  bool prob_target;        // class-probability targets (N, C), else class indices (N)
  GammaSchedule schedule;  // unpacked from a CPU gamma table
  bool table_on_device;    // the table lives on the input's device: kernels read it there
  int64_t ignore_index;
  double label_smoothing;
};

// Checks dtypes, shapes and devices (not target values: those need the data) and the gamma
// table (its values too when it is on the CPU).
FocalLossOptions check_focal_loss_args(const at::Tensor& input, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight,
                                       const at::Tensor& gamma, int64_t ignore_index,
                                       double label_smoothing, c10::string_view reduction);

// The gradient phase's own arguments, on every backend: the forward's (N, kRowStats) statistics
// in the math type, a grad_output of N values (reduction="none") or one, on the input's device;
// and, for the in-place variant, `grad`: the forward's contiguous gradient.
void check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                         const at::Tensor& stats, Reduction reduction,
                         const at::Tensor* grad = nullptr);

// A CPU gamma table unpacked, its values checked (finite gammas >= 0, increasing thresholds).
GammaSchedule cpu_gamma_schedule(const at::Tensor& gamma);

// The target as the kernels read it: int64 class indices (uint8 widened), or probabilities in
// the input's dtype or its math type (float32 / float64), contiguous.
at::Tensor kernel_target(const at::Tensor& input, const at::Tensor& target, bool prob_target);

// The math type of an input dtype: float64 for float64, float32 otherwise.
inline at::ScalarType math_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// How calibration_bins reads its input: softmax of logits, the values as probabilities, or
// (auto) probabilities when every value of a non-ignored sample lies in [0, 1], logits otherwise.
constexpr int64_t kProbabilities = 0, kLogits = 1, kAuto = -1;

void check_calibration_args(const at::Tensor& input, const at::Tensor& target,
                            const at::Tensor& boundaries, int64_t mode);

void check_sweep_args(const at::Tensor& logits, const at::Tensor& target,
                      const at::Tensor& temperatures, const at::Tensor& boundaries);

}  // namespace calibkernels
