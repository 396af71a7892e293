// Argument checks and schedule packing shared by every backend's op implementation.
#pragma once

#include <ATen/ATen.h>

#include "focal_loss_row.h"

namespace calibkernels {

enum class Reduction { None, Mean, Sum };

Reduction parse_reduction(c10::string_view reduction);

// Checks dtypes and shapes (not target values: those need the data) and packs the schedule.
GammaSchedule check_focal_loss_args(const at::Tensor& logits, const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight,
                                    at::ArrayRef<double> thresholds, at::ArrayRef<double> gammas,
                                    double gamma_default, double label_smoothing);

void check_calibration_args(const at::Tensor& input, const at::Tensor& target,
                            const at::Tensor& boundaries);

}  // namespace calibkernels
