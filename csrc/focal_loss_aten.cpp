// calibkernels::focal_loss_aten: the focal loss of CONTRACT §1 as composite ATen operations. Not
// fused, but differentiable by autograd to any order, by forward-mode AD and by torch.func
// transforms: focal_loss takes it for create_graph=True backwards, dual tensors and functorch.
// The returned loss is in the math type (float32, or float64 for float64 input).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"

namespace calibkernels {
namespace {

// gamma_i from p (no gradient through the choice), the table's values used as tensors: reading
// them on the host would be a synchronisation, and would break a traced graph.
at::Tensor gamma_per_sample(const at::Tensor& p, const at::Tensor& table) {
  const int64_t n = (table.numel() - 1) / 2;
  const at::Tensor t = table.to(p.options(), /*non_blocking=*/true);  // no host sync on CUDA
  at::Tensor g = t.select(0, 2 * n).expand(p.sizes());
  const at::Tensor pd = p.detach();
  for (int64_t j = n - 1; j >= 0; --j) g = at::where(pd < t.select(0, j), t.select(0, n + j), g);
  return g;
}

// q^gamma, with the limit at q = 0 (0, or 1 for gamma = 0) taken without ever forming
// gamma q^(gamma - 1) there: pow's derivative is infinite at 0 for gamma < 1, and inf x 0 is NaN.
at::Tensor pow_gamma(const at::Tensor& q, const at::Tensor& gamma) {
  const at::Tensor positive = q > 0;
  const at::Tensor safe = at::where(positive, q, at::ones_like(q));
  return at::where(positive, safe.pow(gamma), (gamma == 0).to(q.scalar_type()));
}

at::Tensor focal_loss_aten(const at::Tensor& input, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight, const at::Tensor& gamma,
                           int64_t ignore_index, double label_smoothing,
                           c10::string_view reduction) {
  const Reduction red = parse_reduction(reduction);
  TORCH_CHECK_VALUE(input.dim() == 2, "focal_loss: input must be 2-D (N, C), got shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(gamma.dim() == 1 && gamma.numel() % 2 == 1 &&
                        gamma.numel() <= 2 * kMaxGammaPieces + 1,
                    "focal_loss: gamma must be a table of 2 n + 1 values");
  const auto acc = math_type(input.scalar_type());
  const at::Tensor x = input.to(acc);
  const int64_t C = x.size(1);
  const double eps = label_smoothing, b = eps / static_cast<double>(C);
  const at::Tensor lp = at::log_softmax(x, 1);
  const at::Tensor w = weight.has_value() ? weight->to(acc) : at::Tensor();
  at::Tensor loss;
  if (target.is_floating_point()) {
    const at::Tensor t = target.to(acc);
    const at::Tensor g = gamma_per_sample((t * lp.exp()).sum(1), gamma);
    at::Tensor a = t * (1.0 - eps) + b;
    if (w.defined()) a = a * w;
    // q = 1 - p as -expm1(log p), exact as p -> 1.
    loss = -(a * pow_gamma(-at::expm1(lp), g.unsqueeze(1)) * lp).sum(1);
    if (red == Reduction::None) return loss;
    return red == Reduction::Sum ? loss.sum() : loss.mean();
  }
  const at::Tensor y = target.to(at::kLong);
  const at::Tensor valid = y != ignore_index;
  const at::Tensor y_safe = at::where(valid, y, at::zeros_like(y));
  const at::Tensor lp_y = lp.gather(1, y_safe.unsqueeze(1)).squeeze(1);
  const at::Tensor g = gamma_per_sample(lp_y.exp(), gamma);
  const at::Tensor w_y = (w.defined() ? w.index_select(0, y_safe) : at::ones_like(lp_y)) * valid;
  loss = -(1.0 - eps) * w_y * pow_gamma(-at::expm1(lp_y), g) * lp_y;
  if (eps > 0.0) {
    at::Tensor focal = pow_gamma(-at::expm1(lp), g.unsqueeze(1)) * lp;
    if (w.defined()) focal = focal * w;
    loss = loss - b * focal.sum(1) * valid;
  }
  loss = at::where(valid, loss, at::zeros_like(loss));  // an ignored sample is 0, whatever its logits
  if (red == Reduction::None) return loss;
  return red == Reduction::Sum ? loss.sum() : loss.sum() / w_y.sum();
}

}  // namespace

TORCH_LIBRARY_IMPL(calibkernels, CompositeImplicitAutograd, m) {
  m.impl("focal_loss_aten", &focal_loss_aten);
}

}  // namespace calibkernels
