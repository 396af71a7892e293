// CUDA implementation of the focal loss's phases over a window of classes: checks, allocations,
// the stream, and the torch-free launchers of focal_loss_phases_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ops.h"
#include "cuda_ops.h"
#include "focal_loss_phases_launch.h"

namespace calibkernels {
namespace {

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// The launch parameters of a window (input (N, width)); the tensors stay alive in `keep`.
FocalPhasesLaunch window_launch(const at::Tensor& input, const at::Tensor& target,
                                int64_t class_offset, int64_t n_classes, int64_t ignore_index,
                                std::vector<at::Tensor>& keep, const char* what) {
  TORCH_CHECK_VALUE(input.dim() == 2 && at::isFloatingType(input.scalar_type()), what,
                    ": input must be a 2-D (N, C_window) floating tensor, got ",
                    input.scalar_type(), " of shape ", input.sizes());
  TORCH_CHECK_VALUE((target.scalar_type() == at::kLong || target.scalar_type() == at::kByte) &&
                        target.dim() == 1 && target.size(0) == input.size(0) &&
                        target.device() == input.device(),
                    what, ": target must hold class indices (int64 or uint8) of shape (",
                    input.size(0), ") on the input's device");
  TORCH_CHECK_VALUE(class_offset >= 0 && (n_classes < 0 || class_offset + input.size(1) <= n_classes),
                    what, ": the window [", class_offset, ", ", class_offset + input.size(1),
                    ") must lie in [0, ", n_classes, ")");
  keep.push_back(input.contiguous());
  keep.push_back(target.to(at::kLong).contiguous());
  FocalPhasesLaunch p{};
  p.dtype = to_dtype(input.scalar_type());
  p.input = keep[0].const_data_ptr();
  p.target = keep[1].const_data_ptr<int64_t>();
  p.n_rows = input.size(0);
  p.width = input.size(1);
  p.class_offset = class_offset;
  p.n_classes = n_classes;
  p.ignore_index = ignore_index;
  return p;
}

at::Tensor partial_stats_cuda(const at::Tensor& input, const at::Tensor& target,
                              int64_t class_offset, int64_t ignore_index) {
  c10::cuda::CUDAGuard guard(input.device());
  std::vector<at::Tensor> keep;
  FocalPhasesLaunch p = window_launch(input, target, class_offset, -1, ignore_index, keep,
                                      "focal_loss_partial_stats");
  at::Tensor out = at::empty({p.n_rows, 4}, input.options().dtype(math_type(input.scalar_type())));
  p.out = out.mutable_data_ptr();
  check(launch_focal_partial_stats(p, c10::cuda::getCurrentCUDAStream()),
        "focal_loss_partial_stats");
  return out;
}

at::Tensor partial_sums_cuda(const at::Tensor& input, const at::Tensor& target,
                             const at::Tensor& gamma, const at::Tensor& row_stats,
                             int64_t class_offset, int64_t n_classes, int64_t ignore_index,
                             double label_smoothing) {
  c10::cuda::CUDAGuard guard(input.device());
  std::vector<at::Tensor> keep;
  FocalPhasesLaunch p = window_launch(input, target, class_offset, n_classes, ignore_index, keep,
                                      "focal_loss_partial_sums");
  const auto acc = math_type(input.scalar_type());
  TORCH_CHECK_VALUE(row_stats.dim() == 2 && row_stats.size(0) == p.n_rows &&
                        row_stats.size(1) == 4 && row_stats.scalar_type() == acc,
                    "focal_loss_partial_sums: row_stats must be the combined (N, 4) statistics");
  TORCH_CHECK_VALUE(row_stats.device() == input.device(),
                    "focal_loss_partial_sums: row_stats must be on the input's device (",
                    input.device(), "), got ", row_stats.device());
  const at::Tensor g = row_stats.contiguous();
  p.schedule = cpu_gamma_schedule(gamma);
  p.smoothing = label_smoothing;
  p.row_stats = g.const_data_ptr();
  at::Tensor out = at::empty({p.n_rows, 2}, g.options());
  p.out = out.mutable_data_ptr();
  check(launch_focal_partial_sums(p, c10::cuda::getCurrentCUDAStream()),
        "focal_loss_partial_sums");
  return out;
}

std::tuple<at::Tensor, at::Tensor> finish_cuda(const at::Tensor& row_stats, const at::Tensor& sums,
                                               const at::Tensor& target, const at::Tensor& gamma,
                                               int64_t n_classes, int64_t ignore_index,
                                               double label_smoothing,
                                               c10::string_view reduction) {
  c10::cuda::CUDAGuard guard(row_stats.device());
  // a tensor elsewhere would be a host or another GPU's pointer in the kernel
  TORCH_CHECK_VALUE(target.device() == row_stats.device() &&
                        (sums.numel() == 0 || sums.device() == row_stats.device()),
                    "focal_loss_finish: target and sums must be on row_stats' device (",
                    row_stats.device(), "), got ", target.device(), " and ", sums.device());
  const Reduction red = parse_reduction(reduction);
  const at::Tensor g = row_stats.contiguous(), t = target.to(at::kLong).contiguous();
  const int64_t N = g.size(0);
  TORCH_CHECK_VALUE(g.dim() == 2 && g.size(1) == 4 &&
                        (g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble),
                    "focal_loss_finish: row_stats must be the combined (N, 4) statistics");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == N, "focal_loss_finish: target must have shape (",
                    N, ")");
  TORCH_CHECK_VALUE(sums.numel() == 0 || (sums.dim() == 2 && sums.size(0) == N && sums.size(1) == 2),
                    "focal_loss_finish: sums must be (N, 2), or empty without label smoothing");
  const at::Tensor sm = sums.numel() ? sums.to(g.scalar_type()).contiguous() : sums;
  // the mean's divisor stays on the device: the count of kept samples (no host sync)
  const at::Tensor divisor = (t != ignore_index).sum().to(at::kDouble);
  FocalPhasesLaunch p{};
  p.dtype = g.scalar_type() == at::kDouble ? DType::Float64 : DType::Float32;
  p.target = t.const_data_ptr<int64_t>();
  p.n_rows = N;
  p.n_classes = n_classes;
  p.ignore_index = ignore_index;
  p.schedule = cpu_gamma_schedule(gamma);
  p.smoothing = label_smoothing;
  p.row_stats = g.const_data_ptr();
  p.sums = sm.numel() ? sm.const_data_ptr() : nullptr;
  p.divisor = red == Reduction::Mean ? divisor.const_data_ptr<double>() : nullptr;
  at::Tensor loss_rows = at::empty({N}, g.options());
  at::Tensor stats = at::empty({N, kRowStats}, g.options());
  p.out = loss_rows.mutable_data_ptr();
  p.out_stats = stats.mutable_data_ptr();
  check(launch_focal_finish(p, c10::cuda::getCurrentCUDAStream()), "focal_loss_finish");
  if (red == Reduction::None) return {loss_rows, stats};
  at::Tensor total = loss_rows.sum(at::kDouble);
  if (red == Reduction::Mean) total = total / divisor;  // 0 / 0 = NaN when all are ignored
  return {total.to(g.scalar_type()), stats};
}

at::Tensor window_grad_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                            const at::Tensor& target, const at::Tensor& stats,
                            int64_t class_offset, int64_t n_classes, int64_t ignore_index,
                            double label_smoothing, c10::string_view reduction) {
  c10::cuda::CUDAGuard guard(input.device());
  std::vector<at::Tensor> keep;
  FocalPhasesLaunch p = window_launch(input, target, class_offset, n_classes, ignore_index, keep,
                                      "focal_loss_window_grad");
  const auto acc = math_type(input.scalar_type());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == p.n_rows && stats.size(1) == kRowStats &&
                        stats.scalar_type() == acc,
                    "focal_loss_window_grad: stats must be focal_loss_finish's statistics");
  TORCH_CHECK_VALUE(stats.device() == input.device(),
                    "focal_loss_window_grad: stats must be on the input's device (",
                    input.device(), "), got ", stats.device());
  p.per_row = parse_reduction(reduction) == Reduction::None;
  TORCH_CHECK_VALUE(p.per_row ? grad_output.numel() == p.n_rows : grad_output.numel() == 1,
                    "focal_loss_window_grad: grad_output must have ", p.per_row ? p.n_rows : 1,
                    " values, got shape ", grad_output.sizes());
  const at::Tensor go = grad_output.to(input.device(), acc).contiguous();
  const at::Tensor st = stats.contiguous();
  p.smoothing = label_smoothing;
  p.stats = st.const_data_ptr();
  p.grad_output = go.const_data_ptr();
  at::Tensor out = at::empty({p.n_rows, p.width}, input.options());
  p.out = out.mutable_data_ptr();
  check(launch_focal_window_grad(p, c10::cuda::getCurrentCUDAStream()), "focal_loss_window_grad");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(calibkernels, CUDA, m) {
  m.impl("focal_loss_partial_stats", &partial_stats_cuda);
  m.impl("focal_loss_partial_sums", &partial_sums_cuda);
  m.impl("focal_loss_finish", &finish_cuda);
  m.impl("focal_loss_window_grad", &window_grad_cuda);
}

}  // namespace calibkernels
