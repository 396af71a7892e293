// The op schemas, defined once; each backend adds a TORCH_LIBRARY_IMPL block in its own file.
#include <Python.h>
#include <torch/library.h>

#include <cmath>

#include "ops.h"

// `import calibkernels._C` loads this library, which registers the ops; no Python bindings needed.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace calibkernels {

Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "none") return Reduction::None;
  if (reduction == "mean") return Reduction::Mean;
  if (reduction == "sum") return Reduction::Sum;
  TORCH_CHECK_VALUE(false, "focal_loss: reduction must be 'none', 'mean' or 'sum', got '",
                    std::string(reduction), "'");
}

static void check_gamma(double g, const char* what) {
  TORCH_CHECK_VALUE(std::isfinite(g) && g >= 0.0, "focal_loss: ", what,
                    " must be a finite number >= 0, got ", g);
}

GammaSchedule check_focal_loss_args(const at::Tensor& logits, const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight,
                                    at::ArrayRef<double> thresholds, at::ArrayRef<double> gammas,
                                    double gamma_default, double label_smoothing) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "focal_loss: logits must be 2-D (N, C), got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(logits.scalar_type()),
                    "focal_loss: logits must be float32, float16, bfloat16 or float64, got ",
                    logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "focal_loss: logits must have at least one class");
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong,
                    "focal_loss: target must hold int64 class indices, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(0),
                    "focal_loss: target must have shape (", logits.size(0), "), got ",
                    target.sizes());
  TORCH_CHECK_VALUE(target.device() == logits.device(), "focal_loss: target is on ",
                    target.device(), " but logits are on ", logits.device());
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(at::isFloatingType(weight->scalar_type()),
                      "focal_loss: weight must be a floating tensor, got ", weight->scalar_type());
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == logits.size(1),
                      "focal_loss: weight must have shape (", logits.size(1), "), got ",
                      weight->sizes());
    TORCH_CHECK_VALUE(weight->device() == logits.device(), "focal_loss: weight is on ",
                      weight->device(), " but logits are on ", logits.device());
  }
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "focal_loss: label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(thresholds.size() == gammas.size(),
                    "focal_loss: a gamma schedule needs one gamma per threshold, got ",
                    thresholds.size(), " thresholds and ", gammas.size(), " gammas");
  TORCH_CHECK_VALUE(thresholds.size() <= static_cast<size_t>(kMaxGammaPieces),
                    "focal_loss: a gamma schedule has at most ", kMaxGammaPieces,
                    " thresholds, got ", thresholds.size());
  GammaSchedule s{};
  s.n = static_cast<int>(thresholds.size());
  for (int j = 0; j < s.n; ++j) {
    TORCH_CHECK_VALUE(thresholds[j] > 0.0 && thresholds[j] <= 1.0,
                      "focal_loss: schedule thresholds must lie in (0, 1], got ", thresholds[j]);
    TORCH_CHECK_VALUE(j == 0 || thresholds[j] > thresholds[j - 1],
                      "focal_loss: schedule thresholds must be strictly increasing, got ",
                      thresholds);
    check_gamma(gammas[j], "every gamma");
    s.thresholds[j] = thresholds[j];
    s.gammas[j] = gammas[j];
  }
  check_gamma(gamma_default, "gamma");
  s.fallback = gamma_default;
  return s;
}

void check_calibration_args(const at::Tensor& input, const at::Tensor& target,
                            const at::Tensor& boundaries) {
  TORCH_CHECK_VALUE(input.dim() == 2, "calibration: logits / probabilities must be 2-D (N, C), "
                    "got shape ", input.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()),
                    "calibration: logits / probabilities must be floating, got ",
                    input.scalar_type());
  TORCH_CHECK_VALUE(input.size(1) >= 1, "calibration: need at least one class");
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong,
                    "calibration: target must hold int64 class indices, got ",
                    target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == input.size(0),
                    "calibration: target must have shape (", input.size(0), "), got ",
                    target.sizes());
  TORCH_CHECK_VALUE(boundaries.scalar_type() == at::kFloat && boundaries.dim() == 1 &&
                        boundaries.size(0) >= 2,
                    "calibration: boundaries must be float32 of shape (n_bins + 1) with "
                    "n_bins >= 1");
  TORCH_CHECK_VALUE(target.device() == input.device() && boundaries.device() == input.device(),
                    "calibration: input, target and boundaries must be on one device");
}

}  // namespace calibkernels

TORCH_LIBRARY(calibkernels, m) {
  // Focal loss of CONTRACT §1 over rows of a contiguous (N, C) logits matrix.
  // Returns (loss, grad): loss is per row (reduction "none") or reduced, in float32 (float64 for
  // float64 logits); grad is d loss / d logits in the logits' dtype, computed in the same pass,
  // or an empty tensor when compute_grad is false.
  m.def(
      "focal_loss(Tensor logits, Tensor target, Tensor? weight, float[] thresholds, "
      "float[] gammas, float gamma_default, int ignore_index, float label_smoothing, "
      "str reduction, bool compute_grad) -> (Tensor, Tensor)");
  // Histogram-binned calibration state of CONTRACT §2 for (N, C) logits (softmax inside) or
  // probabilities, reading them once. boundaries: float32 torch.linspace(0, 1, n_bins + 1).
  // Returns the top-label state (count int64, sum of confidence float64, correct int64; each
  // (n_bins)), the classwise state (the same three, (C, n_bins); empty unless classwise) and the
  // per-sample (confidence, correct) of every row (empty unless per_sample). Samples whose target
  // is ignore_index are left out of the binned state.
  m.def(
      "calibration_bins(Tensor input, Tensor target, Tensor boundaries, bool from_logits, "
      "int ignore_index, bool classwise, bool per_sample) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor)");
}
