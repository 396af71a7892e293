// CUDA implementation of calibkernels::focal_loss: checks, allocations, the current stream, and
// the torch-free launcher of focal_loss_cuda.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ops.h"
#include "cuda_ops.h"
#include "focal_loss_launch.h"

namespace calibkernels {
namespace {

std::tuple<at::Tensor, at::Tensor> focal_loss_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    at::ArrayRef<double> thresholds, at::ArrayRef<double> gammas, double gamma_default,
    int64_t ignore_index, double label_smoothing, c10::string_view reduction, bool compute_grad) {
  const GammaSchedule schedule = check_focal_loss_args(logits, target, weight, thresholds, gammas,
                                                       gamma_default, label_smoothing);
  const Reduction red = parse_reduction(reduction);
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = target.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = weight.has_value() ? weight->to(acc_type).contiguous() : at::Tensor();
  at::Tensor loss_rows = at::empty({N}, x.options().dtype(acc_type));
  at::Tensor loss = at::empty({}, x.options().dtype(acc_type));
  at::Tensor grad = compute_grad ? at::empty({N, C}, x.options()) : at::empty({0}, x.options());
  at::Tensor divisor = at::empty({}, x.options().dtype(at::kDouble));

  FocalLossLaunch p{};
  p.dtype = to_dtype(x.scalar_type());
  p.logits = x.const_data_ptr();
  p.target = t.const_data_ptr<int64_t>();
  p.weight = w.defined() ? w.const_data_ptr() : nullptr;
  p.n_rows = N;
  p.n_classes = C;
  p.ignore_index = ignore_index;
  p.schedule = schedule;
  p.smoothing = label_smoothing;
  p.reduction = red == Reduction::None   ? ReductionKind::None
                : red == Reduction::Mean ? ReductionKind::Mean
                                         : ReductionKind::Sum;
  p.vectorized = rows_aligned16(x) && (!compute_grad || rows_aligned16(grad));
  p.loss_rows = loss_rows.mutable_data_ptr();
  p.loss = loss.mutable_data_ptr();
  p.grad = compute_grad ? grad.mutable_data_ptr() : nullptr;
  p.divisor = divisor.mutable_data_ptr<double>();
  const cudaError_t err = launch_focal_loss(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "focal_loss: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return {red == Reduction::None ? loss_rows : loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(calibkernels, CUDA, m) { m.impl("focal_loss", &focal_loss_cuda); }

}  // namespace calibkernels
