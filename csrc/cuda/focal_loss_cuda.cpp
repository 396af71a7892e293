// CUDA implementation of the focal-loss phase ops: checks, allocations, the current stream, and
// the torch-free launchers of focal_loss_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ops.h"
#include "cuda_ops.h"
#include "focal_loss_launch.h"

namespace calibkernels {
namespace {

ReductionKind to_kind(Reduction r) {
  return r == Reduction::None ? ReductionKind::None
         : r == Reduction::Mean ? ReductionKind::Mean
                                : ReductionKind::Sum;
}

// The launch parameters every phase shares. The tensors must outlive the launch's enqueueing.
struct Operands {
  at::Tensor x, t, w, table;
};

FocalLossLaunch common_launch(const FocalLossOptions& o, Operands& ops, const at::Tensor& input,
                              const at::Tensor& target, const std::optional<at::Tensor>& weight,
                              const at::Tensor& gamma) {
  ops.x = input.contiguous();
  ops.t = kernel_target(ops.x, target, o.prob_target);
  const auto acc_type = math_type(ops.x.scalar_type());
  ops.w = weight.has_value() ? weight->to(acc_type).contiguous() : at::Tensor();
  FocalLossLaunch p{};
  p.dtype = to_dtype(ops.x.scalar_type());
  p.target_dtype = o.prob_target ? to_dtype(ops.t.scalar_type()) : p.dtype;
  p.logits = ops.x.const_data_ptr();
  p.target = o.prob_target ? nullptr : ops.t.const_data_ptr<int64_t>();
  p.probs = o.prob_target ? ops.t.const_data_ptr() : nullptr;
  p.weight = ops.w.defined() ? ops.w.const_data_ptr() : nullptr;
  p.n_rows = ops.x.size(0);
  p.n_classes = ops.x.size(1);
  p.ignore_index = o.ignore_index;
  p.schedule = o.schedule;
  if (o.table_on_device) {  // read by the kernels on the device: no host synchronisation
    ops.table = gamma.contiguous();
    p.table = ops.table.const_data_ptr<double>();
  }
  p.smoothing = o.label_smoothing;
  p.reduction = to_kind(o.reduction);
  p.vectorized = rows_aligned16(ops.x);
  p.bases_aligned = aligned16(ops.x);
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> focal_loss_forward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& gamma, int64_t ignore_index, double label_smoothing,
    c10::string_view reduction, bool compute_grad, std::optional<at::ScalarType> dtype,
    bool compute_stats) {
  const FocalLossOptions o = check_focal_loss_args(input, target, weight, gamma, ignore_index,
                                                   label_smoothing, reduction);
  c10::cuda::CUDAGuard guard(input.device());
  Operands ops;
  FocalLossLaunch p = common_launch(o, ops, input, target, weight, gamma);
  const at::Tensor& x = ops.x;
  const int64_t N = p.n_rows, C = p.n_classes;
  const auto acc_type = math_type(x.scalar_type());
  const auto out_dtype = dtype.value_or(x.scalar_type());
  const bool reduced = o.reduction != Reduction::None;
  at::Tensor loss = reduced ? at::empty({}, x.options().dtype(out_dtype))
                            : at::empty({N}, x.options().dtype(out_dtype));
  at::Tensor grad = compute_grad ? at::empty({N, C}, x.options()) : at::empty({0}, x.options());
  const bool with_stats = compute_grad || compute_stats;
  at::Tensor stats = at::empty({with_stats ? N : 0, kRowStats}, x.options().dtype(acc_type));
  at::Tensor divisor_parts = at::empty({kDivisorParts}, x.options().dtype(at::kDouble));
  p.vectorized = p.vectorized && (!compute_grad || rows_aligned16(grad));  // picks the kernel
  p.bases_aligned = p.bases_aligned && (!compute_grad || aligned16(grad));
  at::Tensor partials = at::empty({reduced ? focal_loss_row_blocks(p) : 0},
                                  x.options().dtype(at::kDouble));
  at::Tensor ticket = at::empty({reduced ? 1 : 0}, x.options().dtype(at::kInt));
  p.out_dtype = to_dtype(out_dtype);
  p.loss = loss.mutable_data_ptr();
  p.grad = compute_grad ? grad.mutable_data_ptr() : nullptr;
  p.stats = with_stats ? stats.mutable_data_ptr() : nullptr;
  p.divisor_parts = divisor_parts.mutable_data_ptr<double>();
  p.partials = reduced ? partials.mutable_data_ptr<double>() : nullptr;
  p.ticket = reduced ? reinterpret_cast<unsigned int*>(ticket.mutable_data_ptr<int>()) : nullptr;
  const cudaError_t err = launch_focal_loss_forward(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "focal_loss: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return {loss, grad, stats};
}

// The gradient phase into `out` (contiguous, the input's dtype and shape).
void run_backward(const at::Tensor& out, const at::Tensor& grad_output, const at::Tensor& input,
                  const at::Tensor& target, const std::optional<at::Tensor>& weight,
                  const at::Tensor& gamma, const at::Tensor& stats, int64_t ignore_index,
                  double label_smoothing, c10::string_view reduction, bool skip_one) {
  const FocalLossOptions o = check_focal_loss_args(input, target, weight, gamma, ignore_index,
                                                   label_smoothing, reduction);
  c10::cuda::CUDAGuard guard(input.device());
  Operands ops;
  FocalLossLaunch p = common_launch(o, ops, input, target, weight, gamma);
  check_backward_args(grad_output, input, stats, o.reduction, skip_one ? &out : nullptr);
  // grad_output is read on the device in its dtype and stride: no cast or copy launched before
  const at::Tensor go = is_kernel_float(grad_output.scalar_type())
                            ? grad_output.reshape({-1})
                            : grad_output.reshape({-1}).to(math_type(ops.x.scalar_type()));
  const at::Tensor st = stats.contiguous();
  p.stats = const_cast<void*>(st.const_data_ptr());
  p.grad = out.mutable_data_ptr();
  p.grad_output = go.const_data_ptr();
  p.go_dtype = to_dtype(go.scalar_type());
  p.go_stride = go.stride(0);
  p.skip_one = skip_one;
  p.vectorized = p.vectorized && rows_aligned16(out);
  p.bases_aligned = p.bases_aligned && aligned16(out);
  const cudaError_t err = launch_focal_loss_backward(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "focal_loss_backward: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

at::Tensor focal_loss_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                    const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight,
                                    const at::Tensor& gamma, const at::Tensor& stats,
                                    int64_t ignore_index, double label_smoothing,
                                    c10::string_view reduction) {
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  run_backward(out, grad_output, input, target, weight, gamma, stats, ignore_index,
               label_smoothing, reduction, /*skip_one=*/false);
  return out;
}

void focal_loss_backward_inplace_cuda(const at::Tensor& grad, const at::Tensor& grad_output,
                                      const at::Tensor& input, const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight,
                                      const at::Tensor& gamma, const at::Tensor& stats,
                                      int64_t ignore_index, double label_smoothing,
                                      c10::string_view reduction) {
  run_backward(grad, grad_output, input, target, weight, gamma, stats, ignore_index,
               label_smoothing, reduction, /*skip_one=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(calibkernels, CUDA, m) {
  m.impl("focal_loss_forward", &focal_loss_forward_cuda);
  m.impl("focal_loss_backward", &focal_loss_backward_cuda);
  m.impl("focal_loss_backward_", &focal_loss_backward_inplace_cuda);
}

}  // namespace calibkernels
