// The CPU kernels' entry points, compiled once per instruction set: each csrc/cpu/*.cpp is built
// with -DCPU_CAPABILITY=DEFAULT, AVX2 and AVX512 (setup.py) into namespaces of those names, and
// csrc/cpu_dispatch.cpp picks one at run time, as ATen does: a wheel built on an AVX-512 machine
// runs on any x86-64 one.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace calibkernels {

using CalibrationOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                      at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using SweepOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The ops' CPU implementations (their schemas: csrc/calibkernels.cpp) for one instruction set.
#define CALIBKERNELS_CPU_KERNELS(cap)                                                          \
  namespace cap {                                                                            \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> focal_loss_forward(                         \
      const at::Tensor& input, const at::Tensor& target,                                     \
      const std::optional<at::Tensor>& weight, const at::Tensor& gamma, int64_t ignore_index, \
      double label_smoothing, c10::string_view reduction, bool compute_grad,                 \
      std::optional<at::ScalarType> dtype, bool compute_stats);                              \
  at::Tensor focal_loss_backward(const at::Tensor& grad_output, const at::Tensor& input,     \
                                 const at::Tensor& target,                                   \
                                 const std::optional<at::Tensor>& weight,                    \
                                 const at::Tensor& gamma, const at::Tensor& stats,           \
                                 int64_t ignore_index, double label_smoothing,               \
                                 c10::string_view reduction);                                \
  void focal_loss_backward_(const at::Tensor& grad, const at::Tensor& grad_output,           \
                            const at::Tensor& input, const at::Tensor& target,               \
                            const std::optional<at::Tensor>& weight, const at::Tensor& gamma, \
                            const at::Tensor& stats, int64_t ignore_index,                   \
                            double label_smoothing, c10::string_view reduction);             \
  CalibrationOutputs calibration_bins(const at::Tensor& input, const at::Tensor& target,     \
                                      const at::Tensor& boundaries, int64_t mode,            \
                                      int64_t ignore_index, bool classwise, bool per_sample); \
  SweepOutputs calibration_sweep(const at::Tensor& logits, const at::Tensor& target,         \
                                 const at::Tensor& temperatures,                             \
                                 const at::Tensor& boundaries, int64_t ignore_index);        \
  at::Tensor focal_loss_partial_stats(const at::Tensor& input, const at::Tensor& target,     \
                                      int64_t class_offset, int64_t ignore_index);           \
  at::Tensor focal_loss_partial_sums(const at::Tensor& input, const at::Tensor& target,      \
                                     const at::Tensor& gamma, const at::Tensor& row_stats,   \
                                     int64_t class_offset, int64_t n_classes,                \
                                     int64_t ignore_index, double label_smoothing);          \
  std::tuple<at::Tensor, at::Tensor> focal_loss_finish(                                      \
      const at::Tensor& row_stats, const at::Tensor& sums, const at::Tensor& target,         \
      const at::Tensor& gamma, int64_t n_classes, int64_t ignore_index,                      \
      double label_smoothing, c10::string_view reduction);                                   \
  at::Tensor focal_loss_window_grad(const at::Tensor& grad_output, const at::Tensor& input,  \
                                    const at::Tensor& target, const at::Tensor& stats,       \
                                    int64_t class_offset, int64_t n_classes,                 \
                                    int64_t ignore_index, double label_smoothing,            \
                                    c10::string_view reduction);                             \
  }

CALIBKERNELS_CPU_KERNELS(DEFAULT)
#if defined(CALIBKERNELS_X86_CAPABILITIES)
CALIBKERNELS_CPU_KERNELS(AVX2)
CALIBKERNELS_CPU_KERNELS(AVX512)
#endif

}  // namespace calibkernels
