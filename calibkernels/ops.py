"""The compiled ops (schemas and kernels in csrc/), with their fake kernels and autograd.

Each op is `torch.ops.calibkernels.<name>`; the public functions wrap these.
"""

from typing import List, Optional, Tuple

import torch

from . import _C  # noqa: F401  (loading the library registers the ops)
from .schedule import GammaSchedule


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
    # loss.backward() passes grad_output = 1: then the stored gradient is the answer and the
    # N x C scaling pass can be skipped. Reading the scalar is free on the CPU; on CUDA it would be
    # a host sync, which CONTRACT §1 rules out. Traced (fake/functional) tensors are skipped.
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


@torch.library.register_fake("calibkernels::calibration_bins")
def _calibration_bins_fake(input, target, boundaries, from_logits, ignore_index, classwise,
                           per_sample):
    torch._check(input.dim() == 2, lambda: "calibration: input must be 2-D (N, C)")
    n, c = input.shape
    n_bins = boundaries.shape[0] - 1
    i64 = dict(dtype=torch.int64, device=input.device)
    f64 = dict(dtype=torch.float64, device=input.device)
    cw = c if classwise else 0
    m = n if per_sample else 0
    return (torch.empty(n_bins, **i64), torch.empty(n_bins, **f64), torch.empty(n_bins, **i64),
            torch.empty(cw, n_bins, **i64), torch.empty(cw, n_bins, **f64),
            torch.empty(cw, n_bins, **i64),
            input.new_empty(m, dtype=_acc_dtype(input.dtype)),
            input.new_empty(m, dtype=torch.bool))


calibration_bins = torch.ops.calibkernels.calibration_bins


# ---- Triton: the same contract, as a triton_op so that torch.compile sees into the kernel ----

try:
    import triton
    from torch.library import triton_op, wrap_triton

    from . import triton_kernels as _tk
except ImportError:  # torch without triton (e.g. a CPU-only build): the C++ ops still work
    triton = None
    focal_loss_triton = None
    calibration_bins_triton = None
else:

    @triton_op("calibkernels::focal_loss_triton", mutates_args=())
    def focal_loss_triton(logits: torch.Tensor, target: torch.Tensor,
                          weight: Optional[torch.Tensor], thresholds: List[float],
                          gammas: List[float], gamma_default: float, ignore_index: int,
                          label_smoothing: float, reduction: str,
                          compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """calibkernels::focal_loss, computed by the Triton kernel (same arguments, outputs)."""
        _check_triton_args(logits, target, weight, thresholds, gammas, gamma_default, reduction)
        x, t = logits.contiguous(), target.contiguous()
        n, c = x.shape
        acc = _acc_dtype(x.dtype)
        w = weight.to(acc).contiguous() if weight is not None else None
        # The mean's divisor, on the device (no host sync): NaN if a target is out of range.
        kept = t != ignore_index
        w_y = w[t.clamp(0, c - 1)].double() if w is not None else \
            torch.ones(n, dtype=torch.float64, device=x.device)
        w_y = torch.where(kept & ((t < 0) | (t >= c)), float("nan"), torch.where(kept, w_y, 0.0))
        divisor = w_y.sum()
        loss_rows = torch.empty(n, dtype=acc, device=x.device)
        grad = torch.empty_like(x, memory_format=torch.contiguous_format) if compute_grad \
            else x.new_empty((0,))
        if n > 0:
            pieces = len(thresholds)
            thr = list(thresholds) + [1.0] * (_tk.MAX_PIECES - pieces)
            gam = list(gammas) + [0.0] * (_tk.MAX_PIECES - pieces)
            block = min(triton.next_power_of_2(c), 4096 if x.element_size() >= 4 else 8192)
            wrap_triton(_tk.focal_loss_rows_kernel)[(n,)](
                x, t, w if w is not None else loss_rows, divisor, loss_rows,
                grad if compute_grad else loss_rows, c, ignore_index, float(label_smoothing),
                *thr, *gam, float(gamma_default), N_PIECES=pieces, HAS_WEIGHT=w is not None,
                HAS_GRAD=compute_grad, SMOOTH=label_smoothing > 0, MEAN=reduction == "mean",
                MATH_T=triton.language.float64 if acc == torch.float64 else
                triton.language.float32,
                BLOCK_C=block, num_warps=4 if block <= 1024 else 8)
        if reduction == "none":
            return loss_rows, grad
        total = loss_rows.sum(dtype=torch.float64)
        if reduction == "mean":
            total = total / divisor
        return total.to(acc), grad

    torch.library.register_autograd("calibkernels::focal_loss_triton", _focal_loss_backward,
                                    setup_context=_focal_loss_setup_context)

    @triton_op("calibkernels::calibration_bins_triton", mutates_args=())
    def calibration_bins_triton(
            input: torch.Tensor, target: torch.Tensor, boundaries: torch.Tensor,
            from_logits: bool, ignore_index: int, classwise: bool, per_sample: bool
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
               torch.Tensor, torch.Tensor, torch.Tensor]:
        """calibkernels::calibration_bins, computed by the Triton kernels (same outputs)."""
        _check_triton_calibration_args(input, target, boundaries)
        x, t, beta = input.contiguous(), target.contiguous(), boundaries.contiguous()
        n, c = x.shape
        n_bins = beta.numel() - 1
        nb = triton.next_power_of_2(n_bins)
        acc = _acc_dtype(x.dtype)
        math_t = triton.language.float64 if acc == torch.float64 else triton.language.float32
        dev = x.device
        conf = torch.empty(n, dtype=acc, device=dev)
        correct = torch.empty(n, dtype=torch.bool, device=dev)
        stats = classwise and from_logits
        row_max = torch.empty(n if stats else 0, dtype=acc, device=dev)
        row_sum = torch.empty(n if stats else 0, dtype=acc, device=dev)
        if n > 0:
            block = min(triton.next_power_of_2(c), 4096)
            wrap_triton(_tk.calibration_rows_kernel)[(n,)](
                x, t, conf, correct, row_max if stats else conf, row_sum if stats else conf, c,
                ignore_index, FROM_LOGITS=from_logits, STATS=stats, MATH_T=math_t,
                BLOCK_C=block, num_warps=4 if block <= 1024 else 8)
        # Partial sums per chunk of rows, then a sum over the chunks: a fixed order, no atomics.
        block_r = max(16, min(1024, 8192 // nb))
        chunks = max(1, triton.cdiv(n, block_r))
        i64 = dict(dtype=torch.int64, device=dev)
        part = (torch.zeros(chunks, n_bins, **i64),
                torch.zeros(chunks, n_bins, dtype=torch.float64, device=dev),
                torch.zeros(chunks, n_bins, **i64))
        if n > 0:
            wrap_triton(_tk.calibration_top_partials_kernel)[(chunks,)](
                conf, correct, t, beta, *part, n, ignore_index, N_BINS=n_bins, NB=nb,
                BLOCK_R=block_r)
        counts, conf_sums, hits = (q.sum(0) for q in part)
        cw_rows = c if classwise else 0
        cw = (torch.zeros(cw_rows, n_bins, **i64),
              torch.zeros(cw_rows, n_bins, dtype=torch.float64, device=dev),
              torch.zeros(cw_rows, n_bins, **i64))
        if classwise and n > 0:
            block_k = 32
            cw_chunks = max(1, min(triton.cdiv(n, 256), (1 << 22) // (c * n_bins)))
            rows_per_chunk = triton.cdiv(n, cw_chunks)
            cw_part = (torch.zeros(cw_chunks, c, n_bins, **i64),
                       torch.zeros(cw_chunks, c, n_bins, dtype=torch.float64, device=dev),
                       torch.zeros(cw_chunks, c, n_bins, **i64))
            wrap_triton(_tk.calibration_classwise_partials_kernel)[
                (cw_chunks, triton.cdiv(c, block_k))](
                x, t, row_max if stats else conf, row_sum if stats else conf, conf, beta,
                *cw_part, n, c, ignore_index, rows_per_chunk, FROM_LOGITS=from_logits,
                MATH_T=math_t, N_BINS=n_bins, NB=nb, BLOCK_R=max(1, min(16, 1024 // nb)),
                BLOCK_K=block_k)
            cw = tuple(q.sum(0) for q in cw_part)
        if not per_sample:
            conf, correct = conf[:0], correct[:0]
        return (counts, conf_sums, hits, *cw, conf.clone(), correct.clone())


def _check_triton_calibration_args(input, target, boundaries):
    if input.dim() != 2 or not input.is_floating_point() or input.shape[1] < 1:
        raise ValueError(f"calibration: logits / probabilities must be 2-D (N, C) floating, got "
                         f"{input.dtype} of shape {tuple(input.shape)}")
    if target.dtype != torch.int64 or tuple(target.shape) != (input.shape[0],):
        raise ValueError(f"calibration: target must hold int64 class indices of shape "
                         f"({input.shape[0]},)")
    if boundaries.dtype != torch.float32 or boundaries.dim() != 1 or boundaries.numel() < 2:
        raise ValueError("calibration: boundaries must be float32 of shape (n_bins + 1)")


def _check_triton_args(logits, target, weight, thresholds, gammas, gamma_default, reduction):
    # The C++ ops check in csrc/calibkernels.cpp; the Triton op checks the same here.
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"focal_loss: logits must be a 2-D (N, C) floating tensor, got "
                         f"{logits.dtype} of shape {tuple(logits.shape)}")
    if target.dtype != torch.int64 or tuple(target.shape) != (logits.shape[0],):
        raise ValueError(f"focal_loss: target must hold int64 class indices of shape "
                         f"({logits.shape[0]},), got {target.dtype} of shape "
                         f"{tuple(target.shape)}")
    if weight is not None and tuple(weight.shape) != (logits.shape[1],):
        raise ValueError(f"focal_loss: weight must have shape ({logits.shape[1]},)")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"focal_loss: reduction must be 'none', 'mean' or 'sum', got "
                         f"'{reduction}'")
    GammaSchedule(thresholds, gammas, gamma_default)  # validates the schedule
