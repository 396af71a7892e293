// The CPU ops: each call runs the kernels of the widest instruction set this CPU has (as torch
// reports it, so ATEN_CPU_CAPABILITY lowers it too) among those built (cpu/kernels.h);
// CALIBKERNELS_CPU_CAPABILITY=DEFAULT|AVX2|AVX512, read at every call, forces a lower one.
#include <torch/library.h>

#include <ATen/Version.h>

#include <cstdlib>
#include <string>

#include "cpu/kernels.h"
#include "ops.h"

namespace calibkernels {
namespace {

enum class Capability : int { Default = 0, Avx2 = 1, Avx512 = 2 };
const char* const kNames[] = {"DEFAULT", "AVX2", "AVX512"};

#if defined(CALIBKERNELS_X86_CAPABILITIES)
constexpr Capability kBuilt = Capability::Avx512;
#else
constexpr Capability kBuilt = Capability::Default;
#endif

Capability parse(const std::string& name, bool strict) {
  for (int c = 0; c < 3; ++c) {
    if (name == kNames[c]) return static_cast<Capability>(c);
  }
  TORCH_CHECK_VALUE(!strict, "CALIBKERNELS_CPU_CAPABILITY must be DEFAULT, AVX2 or AVX512, got '",
                    name, "'");
  return Capability::Default;  // torch's names on other architectures (VSX, SVE...): no SIMD here
}

Capability capability() {
  static const Capability machine = std::min(parse(at::get_cpu_capability(), false), kBuilt);
  const char* forced = std::getenv("CALIBKERNELS_CPU_CAPABILITY");
  if (forced == nullptr || *forced == '\0') return machine;
  return std::min(machine, parse(forced, true));
}

#if defined(CALIBKERNELS_X86_CAPABILITIES)
#define CK_CPU_DISPATCH(fn, ...)                                    \
  switch (capability()) {                                           \
    case Capability::Avx512: return AVX512::fn(__VA_ARGS__);        \
    case Capability::Avx2: return AVX2::fn(__VA_ARGS__);            \
    default: return DEFAULT::fn(__VA_ARGS__);                       \
  }
#else
#define CK_CPU_DISPATCH(fn, ...) return DEFAULT::fn(__VA_ARGS__);
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor> focal_loss_forward(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& gamma, int64_t ignore_index, double label_smoothing,
    c10::string_view reduction, bool compute_grad, std::optional<at::ScalarType> dtype,
    bool compute_stats) {
  CK_CPU_DISPATCH(focal_loss_forward, input, target, weight, gamma, ignore_index,
                  label_smoothing, reduction, compute_grad, dtype, compute_stats)
}

at::Tensor focal_loss_backward(const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& target, const std::optional<at::Tensor>& weight,
                               const at::Tensor& gamma, const at::Tensor& stats,
                               int64_t ignore_index, double label_smoothing,
                               c10::string_view reduction) {
  CK_CPU_DISPATCH(focal_loss_backward, grad_output, input, target, weight, gamma, stats,
                  ignore_index, label_smoothing, reduction)
}

void focal_loss_backward_(const at::Tensor& grad, const at::Tensor& grad_output,
                          const at::Tensor& input, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight, const at::Tensor& gamma,
                          const at::Tensor& stats, int64_t ignore_index, double label_smoothing,
                          c10::string_view reduction) {
  CK_CPU_DISPATCH(focal_loss_backward_, grad, grad_output, input, target, weight, gamma, stats,
                  ignore_index, label_smoothing, reduction)
}

CalibrationOutputs calibration_bins(const at::Tensor& input, const at::Tensor& target,
                                    const at::Tensor& boundaries, int64_t mode,
                                    int64_t ignore_index, bool classwise, bool per_sample) {
  CK_CPU_DISPATCH(calibration_bins, input, target, boundaries, mode, ignore_index, classwise,
                  per_sample)
}

SweepOutputs calibration_sweep(const at::Tensor& logits, const at::Tensor& target,
                               const at::Tensor& temperatures, const at::Tensor& boundaries,
                               int64_t ignore_index) {
  CK_CPU_DISPATCH(calibration_sweep, logits, target, temperatures, boundaries, ignore_index)
}

at::Tensor focal_loss_partial_stats(const at::Tensor& input, const at::Tensor& target,
                                   int64_t class_offset, int64_t ignore_index) {
  CK_CPU_DISPATCH(focal_loss_partial_stats, input, target, class_offset, ignore_index)
}

at::Tensor focal_loss_partial_sums(const at::Tensor& input, const at::Tensor& target,
                                   const at::Tensor& gamma, const at::Tensor& row_stats,
                                   int64_t class_offset, int64_t n_classes, int64_t ignore_index,
                                   double label_smoothing) {
  CK_CPU_DISPATCH(focal_loss_partial_sums, input, target, gamma, row_stats, class_offset,
                  n_classes, ignore_index, label_smoothing)
}

std::tuple<at::Tensor, at::Tensor> focal_loss_finish(const at::Tensor& row_stats,
                                                     const at::Tensor& sums,
                                                     const at::Tensor& target,
                                                     const at::Tensor& gamma, int64_t n_classes,
                                                     int64_t ignore_index, double label_smoothing,
                                                     c10::string_view reduction) {
  CK_CPU_DISPATCH(focal_loss_finish, row_stats, sums, target, gamma, n_classes, ignore_index,
                  label_smoothing, reduction)
}

at::Tensor focal_loss_window_grad(const at::Tensor& grad_output, const at::Tensor& input,
                                  const at::Tensor& target, const at::Tensor& stats,
                                  int64_t class_offset, int64_t n_classes, int64_t ignore_index,
                                  double label_smoothing, c10::string_view reduction) {
  CK_CPU_DISPATCH(focal_loss_window_grad, grad_output, input, target, stats, class_offset,
                  n_classes, ignore_index, label_smoothing, reduction)
}

std::string cpu_capability() { return kNames[static_cast<int>(capability())]; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(calibkernels, m) {
  // The instruction set the CPU kernels run with now: "DEFAULT", "AVX2" or "AVX512".
  m.def("cpu_capability() -> str", &cpu_capability);
}

TORCH_LIBRARY_IMPL(calibkernels, CPU, m) {
  m.impl("focal_loss_forward", &focal_loss_forward);
  m.impl("focal_loss_backward", &focal_loss_backward);
  m.impl("focal_loss_backward_", &focal_loss_backward_);
  m.impl("calibration_bins", &calibration_bins);
  m.impl("calibration_sweep", &calibration_sweep);
  m.impl("focal_loss_partial_stats", &focal_loss_partial_stats);
  m.impl("focal_loss_partial_sums", &focal_loss_partial_sums);
  m.impl("focal_loss_finish", &focal_loss_finish);
  m.impl("focal_loss_window_grad", &focal_loss_window_grad);
}

}  // namespace calibkernels
