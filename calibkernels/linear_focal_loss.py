"""A fused linear + focal loss (CONTRACT §6): focal_loss(hidden @ weight.T + bias, target, ...) for
an LLM head, computed chunk by chunk over the rows so that the N x V logits never exist in full —
the idea of Liger-Kernel's fused linear cross entropy, for the focal loss.

Each chunk: logits_c = h_c @ W^T (+ b); the fused focal kernel gives their loss and gradient in
one pass; grad_h_c = g_c @ W, and grad_W, grad_b are accumulated (in float32 for 16-bit inputs).
The gradients come from the forward, so backward only applies grad_output: nothing when it is 1
(decided on the device on CUDA, without a host sync), one pass over the (N + V) x H gradients
otherwise. In float16 the mean's 1 / N is applied to the hidden gradient together with
grad_output (a loss scale), never before it: that is one pass over N x H in every backward.
reduction="none" cannot fold a per-row grad_output into the accumulated grad_W, so there the
backward recomputes each chunk's logits with grad_output applied (twice the matmuls).
"""

import math

import torch
from torch import nn

from . import ops
from .focal_loss import resolve_backend
from .schedule import gamma_table

REDUCTIONS = ("none", "mean", "sum")


def default_chunk_size(n_rows, hidden_size, n_classes):
    """Rows per chunk so that a chunk's logits hold about as many values as the hidden states
    (Liger-Kernel's choice): chunk x V ~ N x H, rounded up to a power of two."""
    chunks = max(1, math.ceil(n_classes / max(1, hidden_size)))
    return 1 << max(0, math.ceil(math.log2(max(1, math.ceil(n_rows / chunks)))))


def _scale_unless_one(t, grad_output):
    """t *= grad_output (a scalar), skipped where it is 1: on the CPU read on the host, on CUDA
    decided by the kernel on the device (calibkernels::scale_unless_one_)."""
    if t is not None:
        ops.scale_unless_one_(t, grad_output)


def _logits(h_c, weight, bias):
    return h_c @ weight.T if bias is None else torch.addmm(bias, h_c, weight.T)


def _gradient_buffers(hidden, weight, bias, needs, acc):
    """grad_hidden (filled chunk by chunk) and the float32-for-16-bit grad_weight, grad_bias
    accumulators, each None where autograd does not need it."""
    v, h = weight.shape
    return (torch.empty_like(hidden) if needs[0] else None,
            torch.zeros(v, h, dtype=acc, device=weight.device) if needs[1] else None,
            torch.zeros(v, dtype=acc, device=weight.device)
            if needs[3] and bias is not None else None)


def _accumulate(grads, g_c, h_c, weight, start, acc):
    """A chunk's logit gradient g_c into grad_hidden's rows and the grad_weight, grad_bias sums."""
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        torch.mm(g_c, weight, out=grad_hidden[start:start + g_c.shape[0]])
    if grad_weight is not None:
        grad_weight.addmm_(g_c.T.to(acc), h_c.to(acc))
    if grad_bias is not None:
        grad_bias += g_c.sum(0, dtype=acc)


class _LinearFocalLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, bias, table, ignore_index, reduction, eps, chunk,
                kernel):
        n = hidden.shape[0]
        needs = ctx.needs_input_grad
        grad_rows = reduction != "none" and (needs[0] or needs[1] or needs[3])
        acc = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
        grads = _gradient_buffers(hidden, weight, bias, needs if grad_rows else (False,) * 4,
                                  acc)
        loss_rows = torch.empty(n, dtype=acc, device=hidden.device)
        forward = ops.focal_loss_forward_op(kernel)
        for start in range(0, n, chunk):
            h_c, t_c = hidden[start:start + chunk], target[start:start + chunk]
            loss_c, g_c, _ = forward(_logits(h_c, weight, bias), t_c, None, table,
                                     ignore_index, eps, "none", grad_rows, acc)
            loss_rows[start:start + chunk] = loss_c
            if grad_rows:
                _accumulate(grads, g_c, h_c, weight, start, acc)
        kept = (target != ignore_index).sum()
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, target, bias, table)
            ctx.options = (ignore_index, eps, chunk, kernel, acc)
            return loss_rows.to(hidden.dtype)
        total = loss_rows.sum(dtype=torch.float64)
        ctx.hidden_scale = None
        if reduction == "mean":
            total = total / kept  # 0 / 0 = NaN when every target is ignored, as torch
            inv = 1.0 / kept.clamp_min(1).to(acc)
            for g in grads[1:] if hidden.dtype == torch.float16 else grads:
                if g is not None:
                    g.mul_(inv)
            # float16: 1 / N waits for grad_output (a loss scale), or the values underflow
            ctx.hidden_scale = inv if hidden.dtype == torch.float16 else None
        ctx.grads = grads
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError("calibkernels.linear_focal_loss does not support double backward "
                               "(create_graph=True): form logits = hidden @ weight.T + bias and "
                               "use calibkernels.focal_loss, which does")
        if not hasattr(ctx, "grads"):
            return _LinearFocalLoss._recompute(ctx, grad_output)
        grad_hidden, grad_weight, grad_bias = ctx.grads
        del ctx.grads  # handed out once (retain_graph: a second backward has nothing to give)
        for g in (grad_weight, grad_bias):
            _scale_unless_one(g, grad_output)
        if ctx.hidden_scale is not None:  # float32: the scale and 1 / N meet before rounding
            _scale_unless_one(grad_hidden, grad_output.float() * ctx.hidden_scale)
        else:
            _scale_unless_one(grad_hidden, grad_output)
        w_dtype, b_dtype = ctx.dtypes
        return (grad_hidden, None if grad_weight is None else grad_weight.to(w_dtype), None,
                None if grad_bias is None else grad_bias.to(b_dtype),
                None, None, None, None, None, None)

    @staticmethod
    def _recompute(ctx, grad_output):
        """reduction="none": each chunk's logits again, the gradient phase with grad_output."""
        hidden, weight, target, bias, table = ctx.saved_tensors
        ignore_index, eps, chunk, kernel, acc = ctx.options
        grads = _gradient_buffers(hidden, weight, bias, ctx.needs_input_grad, acc)
        forward = ops.focal_loss_forward_op(kernel)
        backward = ops.focal_loss_backward_op(kernel)
        for start in range(0, hidden.shape[0], chunk):
            h_c, t_c = hidden[start:start + chunk], target[start:start + chunk]
            logits = _logits(h_c, weight, bias)
            _, _, stats = forward(logits, t_c, None, table, ignore_index, eps, "none", False, acc,
                                  compute_stats=True)
            g_c = backward(grad_output[start:start + chunk], logits, t_c, None, table, stats,
                           ignore_index, eps, "none")
            del logits
            _accumulate(grads, g_c, h_c, weight, start, acc)
        grad_hidden, grad_weight, grad_bias = grads
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None,
                None if grad_bias is None else grad_bias.to(bias.dtype),
                None, None, None, None, None, None)


def linear_focal_loss(hidden, weight, target, bias=None, *, gamma=3.0, ignore_index=-100,
                      reduction="mean", label_smoothing=0.0, chunk_size=None, backend="auto"):
    """focal_loss(hidden @ weight.T + bias, target, ...) without ever holding the N x V logits:
    hidden (N, H), weight (V, H) (passed in: a tied LM head works), bias (V) or None, target (N)
    class indices. Peak extra memory O(chunk_size x V + N). chunk_size: rows per chunk; by
    default about N·H / V (a chunk's logits as large as the hidden states, as Liger-Kernel
    picks), a power of two. gamma, ignore_index, reduction, label_smoothing and backend are
    focal_loss's (no class weights)."""
    if not all(isinstance(t, torch.Tensor) for t in (hidden, weight, target)):
        raise ValueError("linear_focal_loss: hidden, weight and target must be tensors")
    ops.check_float(hidden, "linear_focal_loss: hidden")
    ops.check_float(weight, "linear_focal_loss: weight")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_focal_loss: hidden must be (N, H) and weight (V, H), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if tuple(target.shape) != (hidden.shape[0],) or target.is_floating_point():
        raise ValueError(f"linear_focal_loss: target must hold class indices of shape "
                         f"({hidden.shape[0]},), got {target.dtype} {tuple(target.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear_focal_loss: bias must have shape ({weight.shape[0]},)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_focal_loss: reduction must be one of {REDUCTIONS}, "
                         f"got {reduction!r}")
    if chunk_size is None:
        chunk_size = default_chunk_size(*hidden.shape, weight.shape[0])
    if isinstance(chunk_size, bool) or int(chunk_size) < 1:
        raise ValueError(f"linear_focal_loss: chunk_size must be an int >= 1, got {chunk_size!r}")
    row_bytes = weight.shape[0] * hidden.element_size()
    kernel = resolve_backend(backend, hidden.device, row_bytes=row_bytes)
    if kernel == "torch":
        raise ValueError(f"linear_focal_loss: no fused kernel for {hidden.device} tensors")
    return _LinearFocalLoss.apply(hidden, weight, target.to(torch.int64), bias,
                                  gamma_table(gamma), int(ignore_index), reduction,
                                  float(label_smoothing), int(chunk_size), kernel)


class LinearFocalLoss(nn.Module):
    """The options of linear_focal_loss; forward(hidden, weight, target, bias=None). The weight is
    passed in, not owned: a tied LM head (the embedding matrix) works unchanged."""

    def __init__(self, *, gamma=3.0, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                 chunk_size=None, backend="auto"):
        super().__init__()
        gamma_table(gamma)  # validate now, not at the first batch
        self.gamma, self.ignore_index, self.reduction = gamma, ignore_index, reduction
        self.label_smoothing, self.chunk_size, self.backend = label_smoothing, chunk_size, backend

    def forward(self, hidden, weight, target, bias=None):
        return linear_focal_loss(hidden, weight, target, bias, gamma=self.gamma,
                                 ignore_index=self.ignore_index, reduction=self.reduction,
                                 label_smoothing=self.label_smoothing, chunk_size=self.chunk_size,
                                 backend=self.backend)

    def extra_repr(self):
        return (f"gamma={self.gamma}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
                f"chunk_size={self.chunk_size}")
