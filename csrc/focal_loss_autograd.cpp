// calibkernels::focal_loss, the differentiable op: autograd in C++ (one node, no Python in the
// training loop), autocast (a float32 loss without a float32 copy of the logits), and the routes
// to the composite formula where the fused kernels cannot serve (CONTRACT §1, Backward).
#include <ATen/FuncTorchTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "ops.h"

namespace calibkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOp = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
    int64_t, double, c10::string_view, bool, std::optional<at::ScalarType>, bool);
using BackwardOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, const at::Tensor&,
                              const at::Tensor&, int64_t, double, c10::string_view);
using BackwardInplaceOp = void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const std::optional<at::Tensor>&,
                               const at::Tensor&, const at::Tensor&, int64_t, double,
                               c10::string_view);
using AtenOp = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                          const at::Tensor&, int64_t, double, c10::string_view);

// The phase ops of a backend: "native" (csrc/, the kernels of the input's device) or "triton"
// (calibkernels/triton_ops.py registers them when a Triton kernel is first used).
struct PhaseOps {
  c10::TypedOperatorHandle<ForwardOp> forward;
  c10::TypedOperatorHandle<BackwardOp> backward;
  c10::TypedOperatorHandle<BackwardInplaceOp> backward_;
};

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  const auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK_VALUE(handle.has_value(), "calibkernels: the op ", name, " is not registered; the "
                    "Triton kernels register when calibkernels.focal_loss(..., backend=\"triton\")"
                    " is first called (they need triton installed)");
  return handle->typed<Sig>();
}

const PhaseOps& phase_ops(c10::string_view backend) {
  if (backend == "native") {
    static const PhaseOps native{find_op<ForwardOp>("calibkernels::focal_loss_forward"),
                                 find_op<BackwardOp>("calibkernels::focal_loss_backward"),
                                 find_op<BackwardInplaceOp>("calibkernels::focal_loss_backward_")};
    return native;
  }
  TORCH_CHECK_VALUE(backend == "triton", "focal_loss: backend must be 'native' or 'triton', got '",
                    std::string(backend), "'");
  static const PhaseOps triton{
      find_op<ForwardOp>("calibkernels::focal_loss_forward_triton"),
      find_op<BackwardOp>("calibkernels::focal_loss_backward_triton"),
      find_op<BackwardInplaceOp>("calibkernels::focal_loss_backward_triton_")};
  return triton;
}

at::Tensor aten_loss(const at::Tensor& input, const at::Tensor& target,
                     const std::optional<at::Tensor>& weight, const at::Tensor& gamma,
                     int64_t ignore_index, double label_smoothing, c10::string_view reduction) {
  static const auto op = find_op<AtenOp>("calibkernels::focal_loss_aten");
  return op.call(input, target, weight, gamma, ignore_index, label_smoothing, reduction);
}

// A tensor the kernels can take as it is: no fake, functional or functorch wrapper (those mean the
// call is being traced, and the backward must be functional).
bool is_plain(const at::Tensor& t) {
  constexpr c10::DispatchKeySet wrappers({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                          c10::DispatchKey::FuncTorchGradWrapper,
                                          c10::DispatchKey::FuncTorchBatched});
  return t.defined() && t.has_storage() && !t.key_set().has_any(wrappers);
}

struct FocalLossFunction : public torch::autograd::Function<FocalLossFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, const at::Tensor& gamma,
                            int64_t ignore_index, double label_smoothing,
                            c10::string_view reduction, c10::string_view backend,
                            std::optional<at::ScalarType> dtype, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // The forward writes the gradient for grad_output = 1 where the backward will likely take it
    // as it is: an eager scalar loss, not float16. Per-sample losses are masked or weighted and
    // float16 trains under loss scaling (grad_output is almost never 1), and a traced backward
    // (torch.compile, export) cannot take over a buffer: there the forward writes the row
    // statistics alone and the backward runs the gradient phase, 3 passes over N x C, not 4.
    const bool eager_grad = compute_grad && is_plain(input) && reduction != "none" &&
                            input.scalar_type() != at::kHalf;
    auto [loss, grad, stats] = phase_ops(backend).forward.call(
        input, target, weight, gamma, ignore_index, label_smoothing, reduction, eager_grad,
        dtype, /*compute_stats=*/compute_grad);
    ctx->set_materialize_grads(false);
    if (compute_grad) {
      // The forward's gradient (grad_output = 1), if it wrote one, is `grad`; the input and the
      // row statistics let backward write any other grad_output's gradient, rounded once.
      ctx->save_for_backward({input, target, weight.value_or(at::Tensor()), gamma, stats});
      // Not a saved variable: the first backward hands this very buffer out and forgets it, so
      // that nothing the user holds is ever version-checked or rewritten by a later backward.
      if (eager_grad) ctx->saved_data["grad"] = grad;
      ctx->saved_data["ignore_index"] = ignore_index;
      ctx->saved_data["label_smoothing"] = label_smoothing;
      ctx->saved_data["reduction"] = std::string(reduction);
      ctx->saved_data["backend"] = std::string(backend);
    }
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(10);
    const at::Tensor& go = grads[0];
    if (!go.defined()) return out;
    TORCH_CHECK(ctx->saved_data.count("backend"),
                "calibkernels.focal_loss: backward through a call that computed no gradient "
                "(the input did not require grad when it ran)");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &target = saved[1], &gamma = saved[3], &stats = saved[4];
    const std::optional<at::Tensor> weight =
        saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const double eps = ctx->saved_data["label_smoothing"].toDouble();
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    if (at::GradMode::is_enabled()) {
      // create_graph=True: the gradient must itself be differentiable, so it comes from the
      // composite formula, differentiated by autograd (exact second-order terms). Through an
      // alias of the input: hooks and retain_grad() on the input itself must run once, outside.
      const at::Tensor alias = input.view_as(input);
      const at::Tensor loss = aten_loss(alias, target, weight, gamma, ignore_index, eps, reduction);
      out[0] = torch::autograd::grad({loss}, {alias}, {go.to(loss.scalar_type())},
                                     /*retain_graph=*/true, /*create_graph=*/true)[0];
      return out;
    }
    const PhaseOps& ops = phase_ops(ctx->saved_data["backend"].toStringRef());
    const auto stored = ctx->saved_data.find("grad");
    if (stored != ctx->saved_data.end() && is_plain(go) && is_plain(stored->second.toTensor())) {
      // The first backward: the stored gradient is the answer, rewritten in place only where
      // grad_output is not 1 (on CUDA decided on the device), then handed out and forgotten.
      at::Tensor grad = stored->second.toTensor();
      ctx->saved_data.erase(stored);
      at::AutoDispatchBelowADInplaceOrView guard;
      ops.backward_.call(grad, go, input, target, weight, gamma, stats, ignore_index, eps,
                         reduction);
      out[0] = grad;
    } else {
      // No stored gradient (statistics only, or a later backward with retain_graph), or a traced
      // graph: a fresh gradient, one read and one write.
      out[0] = ops.backward.call(go, input, target, weight, gamma, stats, ignore_index, eps,
                                 reduction);
    }
    return out;
  }
};

// Forward-mode AD and torch.func transforms differentiate the composite formula themselves, and
// so does autograd where a gradient must reach the class weights or probability targets.
bool in_functorch_transform() {
  // The check C++ autograd Functions make (FuncTorchTLS): it raises inside a transform.
  const auto& tls = at::functorch::functorchTLSAccessor();
  if (!tls) return false;
  try {
    tls->checkSupportsCppAutogradFunction();
  } catch (const c10::Error&) {
    return true;
  }
  return false;
}

bool needs_composite(const at::Tensor& input, const at::Tensor& target,
                     const std::optional<at::Tensor>& weight) {
  const bool soft = target.is_floating_point();
  if (in_functorch_transform() || input._fw_grad(/*level=*/0).defined() ||
      (soft && target._fw_grad(/*level=*/0).defined()) ||
      (weight.has_value() && weight->_fw_grad(/*level=*/0).defined())) {
    return true;
  }
  return at::GradMode::is_enabled() &&
         ((weight.has_value() && weight->requires_grad()) || (soft && target.requires_grad()));
}

at::Tensor focal_loss_autograd(const at::Tensor& input, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, const at::Tensor& gamma,
                               int64_t ignore_index, double label_smoothing,
                               c10::string_view reduction, c10::string_view backend,
                               std::optional<at::ScalarType> dtype) {
  if (needs_composite(input, target, weight)) {
    const at::Tensor loss =
        aten_loss(input, target, weight, gamma, ignore_index, label_smoothing, reduction);
    return loss.to(dtype.value_or(input.scalar_type()));
  }
  const bool compute_grad = at::GradMode::is_enabled() && input.requires_grad();
  return FocalLossFunction::apply(input, target, weight, gamma, ignore_index, label_smoothing,
                                  reduction, backend, dtype, compute_grad);
}

// Below autograd (inference mode, or autograd excluded): the forward phase alone.
at::Tensor focal_loss_forward_only(const at::Tensor& input, const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight,
                                   const at::Tensor& gamma, int64_t ignore_index,
                                   double label_smoothing, c10::string_view reduction,
                                   c10::string_view backend, std::optional<at::ScalarType> dtype) {
  return std::get<0>(phase_ops(backend).forward.call(input, target, weight, gamma, ignore_index,
                                                     label_smoothing, reduction, false, dtype,
                                                     /*compute_stats=*/false));
}

// Under autocast the loss is float32, as F.cross_entropy's (float64 input stays float64), and the
// logits are read in their own dtype: no cast, no copy.
at::Tensor focal_loss_autocast(const at::Tensor& input, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, const at::Tensor& gamma,
                               int64_t ignore_index, double label_smoothing,
                               c10::string_view reduction, c10::string_view backend,
                               std::optional<at::ScalarType> dtype) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("calibkernels::focal_loss", "").typed<
          at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                     const at::Tensor&, int64_t, double, c10::string_view, c10::string_view,
                     std::optional<at::ScalarType>)>();
  return op.call(input, target, weight, gamma, ignore_index, label_smoothing, reduction, backend,
                 dtype.value_or(math_type(input.scalar_type())));
}

}  // namespace

TORCH_LIBRARY_IMPL(calibkernels, Autograd, m) { m.impl("focal_loss", &focal_loss_autograd); }
TORCH_LIBRARY_IMPL(calibkernels, CompositeExplicitAutograd, m) {
  m.impl("focal_loss", &focal_loss_forward_only);
}
TORCH_LIBRARY_IMPL(calibkernels, AutocastCPU, m) { m.impl("focal_loss", &focal_loss_autocast); }
TORCH_LIBRARY_IMPL(calibkernels, AutocastCUDA, m) { m.impl("focal_loss", &focal_loss_autocast); }

}  // namespace calibkernels
