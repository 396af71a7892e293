"""The compiled ops (schemas and kernels in csrc/), with their fake kernels and autograd.

Each op is `torch.ops.calibkernels.<name>`; the public functions wrap these.
"""

import torch

from . import _C  # noqa: F401  (loading the library registers the ops)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("calibkernels::focal_loss")
def _focal_loss_fake(logits, target, weight, thresholds, gammas, gamma_default, ignore_index,
                     label_smoothing, reduction, compute_grad):
    torch._check(logits.dim() == 2, lambda: "focal_loss: logits must be 2-D (N, C)")
    n = logits.shape[0]
    loss = logits.new_empty((n,) if reduction == "none" else (), dtype=_acc_dtype(logits.dtype))
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad \
        else logits.new_empty((0,))
    return loss, grad


def _focal_loss_setup_context(ctx, inputs, output):
    ctx.reduction = inputs[8]
    ctx.has_grad = inputs[9]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd fills an N x C zero tensor for grad's grad


def _is_eager_cpu_one(t: torch.Tensor) -> bool:
    # Reading a CPU scalar is free (no device sync); traced (fake/functional) tensors are skipped.
    return type(t) is torch.Tensor and t.device.type == "cpu" and t.numel() == 1 and t.item() == 1.0


def _focal_loss_backward(ctx, grad_loss, _grad_of_grad):
    # The gradient was computed with the loss; backward only scales it by grad_output.
    if not ctx.has_grad:
        raise RuntimeError("calibkernels::focal_loss was called with compute_grad=False, "
                           "so it has no gradient to give")
    (grad,) = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 10
    if _is_eager_cpu_one(grad_loss):
        return (grad,) + (None,) * 9  # loss.backward() on the CPU: no pass over N x C at all
    scale = grad_loss.unsqueeze(1) if ctx.reduction == "none" else grad_loss
    grad_logits = (grad * scale).to(grad.dtype)
    return grad_logits, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("calibkernels::focal_loss", _focal_loss_backward,
                                setup_context=_focal_loss_setup_context)

focal_loss = torch.ops.calibkernels.focal_loss
