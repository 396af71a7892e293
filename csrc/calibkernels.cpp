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

// The gamma table [thresholds..., gammas..., default] (see GammaSchedule): its length, and on the
// CPU its values, checked; a table on the input's device is read there by the kernels.
static void check_gamma_table(const at::Tensor& gamma, const at::Tensor& input,
                              FocalLossOptions& o) {
  TORCH_CHECK_VALUE(gamma.scalar_type() == at::kDouble && gamma.dim() == 1,
                    "focal_loss: gamma must be a 1-D float64 table [thresholds..., gammas..., "
                    "default], got ", gamma.scalar_type(), " of shape ", gamma.sizes());
  const int64_t len = gamma.numel();
  TORCH_CHECK_VALUE(len % 2 == 1 && len <= 2 * kMaxGammaPieces + 1,
                    "focal_loss: a gamma table holds 2 n + 1 values for a schedule of n <= ",
                    kMaxGammaPieces, " pieces, got ", len, " values");
  o.table_on_device = !gamma.is_cpu();
  if (o.table_on_device) {
    TORCH_CHECK_VALUE(gamma.device() == input.device(), "focal_loss: gamma is on ",
                      gamma.device(), " but the input is on ", input.device());
    o.schedule = GammaSchedule{};
    o.schedule.n = static_cast<int>((len - 1) / 2);
    return;
  }
  o.schedule = cpu_gamma_schedule(gamma);
}

GammaSchedule cpu_gamma_schedule(const at::Tensor& gamma) {
  TORCH_CHECK_VALUE(gamma.is_cpu() && gamma.scalar_type() == at::kDouble && gamma.dim() == 1 &&
                        gamma.numel() % 2 == 1 && gamma.numel() <= 2 * kMaxGammaPieces + 1,
                    "focal_loss: gamma must be a 1-D float64 CPU table of 2 n + 1 values, n <= ",
                    kMaxGammaPieces);
  const at::Tensor table = gamma.contiguous();
  const GammaSchedule s =
      schedule_from_table(table.const_data_ptr<double>(), static_cast<int>(table.numel()));
  for (int j = 0; j < s.n; ++j) {
    TORCH_CHECK_VALUE(s.thresholds[j] > 0.0 && s.thresholds[j] <= 1.0,
                      "focal_loss: schedule thresholds must lie in (0, 1], got ", s.thresholds[j]);
    TORCH_CHECK_VALUE(j == 0 || s.thresholds[j] > s.thresholds[j - 1],
                      "focal_loss: schedule thresholds must be strictly increasing, got ",
                      at::ArrayRef<double>(s.thresholds, s.n));
    check_gamma(s.gammas[j], "every gamma");
  }
  check_gamma(s.fallback, "gamma");
  return s;
}

FocalLossOptions check_focal_loss_args(const at::Tensor& input, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight,
                                       const at::Tensor& gamma, int64_t ignore_index,
                                       double label_smoothing, c10::string_view reduction) {
  FocalLossOptions o{};
  o.reduction = parse_reduction(reduction);
  o.ignore_index = ignore_index;
  o.label_smoothing = label_smoothing;
  TORCH_CHECK_VALUE(input.dim() == 2, "focal_loss: input must be 2-D (N, C), got shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()),
                    "focal_loss: input must be float32, float16, bfloat16 or float64, got ",
                    input.scalar_type());
  TORCH_CHECK_VALUE(input.size(1) >= 1, "focal_loss: input must have at least one class");
  TORCH_CHECK_VALUE(target.device() == input.device(), "focal_loss: target is on ",
                    target.device(), " but input is on ", input.device());
  o.prob_target = at::isFloatingType(target.scalar_type());
  if (o.prob_target) {
    TORCH_CHECK_VALUE(target.sizes() == input.sizes(),
                      "focal_loss: class-probability targets must have the input's shape ",
                      input.sizes(), ", got ", target.sizes());
    TORCH_CHECK_VALUE(ignore_index < 0, "focal_loss: ignore_index is not supported for "
                      "class-probability targets (as in F.cross_entropy), got ", ignore_index);
  } else {
    TORCH_CHECK_VALUE(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte,
                      "focal_loss: target must hold class indices (int64 or uint8) or class "
                      "probabilities (floating), got ", target.scalar_type());
    TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == input.size(0),
                      "focal_loss: target must have shape (", input.size(0), "), got ",
                      target.sizes());
  }
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(at::isFloatingType(weight->scalar_type()),
                      "focal_loss: weight must be a floating tensor, got ", weight->scalar_type());
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == input.size(1),
                      "focal_loss: weight must have shape (", input.size(1), "), got ",
                      weight->sizes());
    TORCH_CHECK_VALUE(weight->device() == input.device(), "focal_loss: weight is on ",
                      weight->device(), " but input is on ", input.device());
  }
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "focal_loss: label_smoothing must be in [0, 1], got ", label_smoothing);
  check_gamma_table(gamma, input, o);
  return o;
}

void check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                         const at::Tensor& stats, Reduction reduction, const at::Tensor* grad) {
  const int64_t N = input.size(0);
  const auto acc_type = math_type(input.scalar_type());
  TORCH_CHECK_VALUE(stats.scalar_type() == acc_type && stats.dim() == 2 && stats.size(0) == N &&
                        stats.size(1) == kRowStats && stats.device() == input.device(),
                    "focal_loss_backward: stats must be the forward's (N, ", kRowStats, ") ",
                    acc_type, " statistics, got ", stats.scalar_type(), " of shape ",
                    stats.sizes(), " on ", stats.device());
  const bool per_row = reduction == Reduction::None;
  TORCH_CHECK_VALUE(per_row ? grad_output.numel() == N : grad_output.numel() == 1,
                    "focal_loss_backward: grad_output must have ", per_row ? N : 1,
                    " values, got shape ", grad_output.sizes());
  TORCH_CHECK_VALUE(grad_output.device() == input.device(), "focal_loss_backward: grad_output "
                    "is on ", grad_output.device(), " but input is on ", input.device());
  TORCH_CHECK_VALUE(grad == nullptr || (grad->is_contiguous() && grad->sizes() == input.sizes() &&
                                        grad->scalar_type() == input.scalar_type() &&
                                        grad->device() == input.device()),
                    "focal_loss_backward_: grad must be the forward's contiguous gradient");
}

at::Tensor kernel_target(const at::Tensor& input, const at::Tensor& target, bool prob_target) {
  if (!prob_target) return target.to(at::kLong).contiguous();
  const auto t = target.scalar_type();
  const bool readable = t == input.scalar_type() || t == math_type(input.scalar_type());
  return (readable ? target : target.to(math_type(input.scalar_type()))).contiguous();
}

void check_calibration_args(const at::Tensor& input, const at::Tensor& target,
                            const at::Tensor& boundaries, int64_t mode) {
  TORCH_CHECK_VALUE(input.dim() == 2, "calibration: logits / probabilities must be 2-D (N, C), "
                    "got shape ", input.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()),
                    "calibration: logits / probabilities must be floating, got ",
                    input.scalar_type());
  TORCH_CHECK_VALUE(input.size(1) >= 1, "calibration: need at least one class");
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte,
                    "calibration: target must hold class indices (int64 or uint8), got ",
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
  TORCH_CHECK_VALUE(mode == kProbabilities || mode == kLogits || mode == kAuto,
                    "calibration: mode must be 1 (logits), 0 (probabilities) or -1 (auto), got ",
                    mode);
}

void check_sweep_args(const at::Tensor& logits, const at::Tensor& target,
                      const at::Tensor& temperatures, const at::Tensor& boundaries) {
  check_calibration_args(logits, target, boundaries, kLogits);
  TORCH_CHECK_VALUE(temperatures.dim() == 1 && temperatures.numel() >= 1 &&
                        temperatures.numel() <= 256 && temperatures.is_cpu() &&
                        temperatures.scalar_type() == at::kDouble,
                    "calibration_sweep: temperatures must be a 1-D float64 CPU tensor of 1 to 256 "
                    "values, got ", temperatures.scalar_type(), " of shape ",
                    temperatures.sizes(), " on ", temperatures.device());
  const at::Tensor t = temperatures.contiguous();
  const double* v = t.const_data_ptr<double>();
  for (int64_t k = 0; k < t.numel(); ++k) {
    TORCH_CHECK_VALUE(std::isfinite(v[k]) && v[k] > 0.0,
                      "calibration_sweep: temperatures must be finite and > 0, got ", v[k]);
  }
}

}  // namespace calibkernels

TORCH_LIBRARY(calibkernels, m) {
  // Focal loss of CONTRACT §1 over the rows of an (N, C) input: the differentiable op behind
  // calibkernels.focal_loss (autograd and autocast in focal_loss_autograd.cpp). target: class
  // indices (N) or probabilities (N, C); gamma: the float64 table of a GammaSchedule; backend:
  // "native" (the C++ kernels of the input's device) or "triton". The loss has dtype `dtype`
  // (default: the input's; float32 under autocast, as F.cross_entropy).
  m.def(
      "focal_loss(Tensor input, Tensor target, Tensor? weight, Tensor gamma, int ignore_index, "
      "float label_smoothing, str reduction, str backend, ScalarType? dtype=None) -> Tensor");
  // The forward phase: the loss and, when compute_grad, the gradient for grad_output = 1 (in the
  // input's dtype, written in the same pass) and the per-row statistics the backward needs
  // ((N, kRowStats) in the math type: see RowStats in focal_loss_row.h). compute_stats: the
  // statistics without the gradient, for a backward that runs the gradient phase anyway (a
  // traced graph, a recomputing caller); otherwise grad and stats are empty.
  m.def(
      "focal_loss_forward(Tensor input, Tensor target, Tensor? weight, Tensor gamma, "
      "int ignore_index, float label_smoothing, str reduction, bool compute_grad, "
      "ScalarType? dtype=None, bool compute_stats=False) -> "
      "(Tensor loss, Tensor grad, Tensor stats)");
  // The gradient phase: grad_output times d loss / d input, from the input and the forward's
  // statistics (one read of the input, one write), rounded once.
  m.def(
      "focal_loss_backward(Tensor grad_output, Tensor input, Tensor target, Tensor? weight, "
      "Tensor gamma, Tensor stats, int ignore_index, float label_smoothing, str reduction) -> "
      "Tensor");
  // The same into `grad`, which holds the forward's gradient for grad_output = 1: nothing is
  // done where grad_output is 1 (on CUDA decided on the device, without a host sync).
  m.def(
      "focal_loss_backward_(Tensor(a!) grad, Tensor grad_output, Tensor input, Tensor target, "
      "Tensor? weight, Tensor gamma, Tensor stats, int ignore_index, float label_smoothing, "
      "str reduction) -> ()");
  // The same loss as composite ATen operations: differentiable to any order, forward-mode AD and
  // torch.func transforms (focal_loss takes it there; focal_loss_aten.cpp).
  m.def(
      "focal_loss_aten(Tensor input, Tensor target, Tensor? weight, Tensor gamma, "
      "int ignore_index, float label_smoothing, str reduction) -> Tensor");
  // The phases over a window of each row's classes (columns [class_offset, class_offset + C_w)
  // of n_classes): a row split across processes (vocabulary-parallel training) or computed piece
  // by piece (csrc/cpu/focal_loss_phases_cpu.cpp). Class indices only; no class weights.
  // (N, 4) in the math type: max, #equal to it, sum of exp(x - max) over the rest, and the
  // target's logit (-inf when the window does not hold it).
  m.def("focal_loss_partial_stats(Tensor input, Tensor target, int class_offset, "
        "int ignore_index) -> Tensor");
  // With label smoothing: (N, 2) sums over the window of (eps / C) f_k and, for k != y,
  // (eps / C) G_k, from row_stats, the combined (N, 4) statistics of every window.
  m.def("focal_loss_partial_sums(Tensor input, Tensor target, Tensor gamma, Tensor row_stats, "
        "int class_offset, int n_classes, int ignore_index, float label_smoothing) -> Tensor");
  // Each row's loss (reduced as asked, in the math type) and RowStats from the combined
  // statistics and sums (an empty sums tensor without label smoothing).
  m.def("focal_loss_finish(Tensor row_stats, Tensor sums, Tensor target, Tensor gamma, "
        "int n_classes, int ignore_index, float label_smoothing, str reduction) -> "
        "(Tensor loss, Tensor stats)");
  // The window's gradient: grad_output times d loss / d input from focal_loss_finish's stats.
  m.def("focal_loss_window_grad(Tensor grad_output, Tensor input, Tensor target, Tensor stats, "
        "int class_offset, int n_classes, int ignore_index, float label_smoothing, "
        "str reduction) -> Tensor");
  // t *= scale (one value), nothing at all when it is 1 (on CUDA decided on the device): how
  // gradients computed in a forward take grad_output (linear_focal_loss).
  m.def("scale_unless_one_(Tensor(a!) t, Tensor scale) -> ()");
  // Histogram-binned calibration state of CONTRACT §2 for (N, C) input, read once. mode: 1 logits
  // (softmax inside), 0 probabilities, -1 auto (probabilities when every value of a non-ignored
  // sample lies in [0, 1]). boundaries: float32 torch.linspace(0, 1, n_bins + 1). Returns the
  // top-label state (count int64, sum of confidence float64, correct int64; each (n_bins)), the
  // classwise state (the same three, (C, n_bins); empty unless classwise), the per-sample
  // (confidence, correct) of every row (0 and false for an ignored one; empty unless
  // per_sample), and totals: float64 [sum of Brier scores, sum of NLLs, 1 if read as
  // probabilities else 0, ECE, MCE, RMSCE] (the errors of the top-label state, NaN when it is
  // empty). Samples whose target is ignore_index are left out of every sum.
  m.def(
      "calibration_bins(Tensor input, Tensor target, Tensor boundaries, int mode, "
      "int ignore_index, bool classwise, bool per_sample) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ECE state and NLL of softmax(logits / T) for K temperatures (a float64 CPU tensor, K <= 256)
  // from one read of the logits: counts, sums of confidence, correct counts ((K, n_bins) each)
  // and sums of NLL (K), over the samples whose target is not ignore_index.
  m.def(
      "calibration_sweep(Tensor logits, Tensor target, Tensor temperatures, Tensor boundaries, "
      "int ignore_index) -> (Tensor, Tensor, Tensor, Tensor)");
}
