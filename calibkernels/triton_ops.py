"""The Triton ops: calibkernels::focal_loss_{forward,backward}_triton with the schemas of the C++
phase ops (csrc/calibkernels.cpp), so that calibkernels::focal_loss's C++ autograd runs them for
backend="triton", and calibration_bins_triton. triton_ops, so that torch.compile sees into the
kernels. Imported on first use (calibkernels.ops.load_triton): importing triton takes seconds.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import triton_kernels as tk
from .ops import ROW_STATS, _acc_dtype

REDUCTIONS = ("none", "mean", "sum")


def _math_t(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_focal_loss_args(input, target, weight, gamma, ignore_index, label_smoothing,
                           reduction):
    """The checks of check_focal_loss_args (csrc/calibkernels.cpp) that need no data."""
    if input.dim() != 2 or not input.is_floating_point() or input.shape[1] < 1:
        raise ValueError(f"focal_loss: input must be a 2-D (N, C) floating tensor, got "
                         f"{input.dtype} of shape {tuple(input.shape)}")
    prob = target.is_floating_point()
    if prob:
        if tuple(target.shape) != tuple(input.shape):
            raise ValueError(f"focal_loss: class-probability targets must have the input's "
                             f"shape {tuple(input.shape)}, got {tuple(target.shape)}")
        if ignore_index >= 0:
            raise ValueError(f"focal_loss: ignore_index is not supported for class-probability "
                             f"targets (as in F.cross_entropy), got {ignore_index}")
    elif target.dtype not in (torch.int64, torch.uint8) or \
            tuple(target.shape) != (input.shape[0],):
        raise ValueError(f"focal_loss: target must hold class indices (int64 or uint8) of shape "
                         f"({input.shape[0]},), got {target.dtype} of shape "
                         f"{tuple(target.shape)}")
    if weight is not None and tuple(weight.shape) != (input.shape[1],):
        raise ValueError(f"focal_loss: weight must have shape ({input.shape[1]},)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"focal_loss: reduction must be 'none', 'mean' or 'sum', got "
                         f"'{reduction}'")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"focal_loss: label_smoothing must be in [0, 1], got {label_smoothing}")
    if gamma.dtype != torch.float64 or gamma.dim() != 1 or gamma.numel() % 2 != 1 or \
            gamma.numel() > 17:
        raise ValueError("focal_loss: gamma must be a 1-D float64 table of 2 n + 1 values, "
                         "n <= 8")
    return prob


def _prepare(input, target, weight, gamma, prob):
    """Contiguous operands as the kernels read them: probability targets in the input's dtype or
    the math type, weights in the math type, the gamma table on the input's device (an
    asynchronous copy: no host synchronisation)."""
    x = input.contiguous()
    acc = _acc_dtype(x.dtype)
    if prob:
        t = target if target.dtype in (x.dtype, acc) else target.to(acc)
    else:
        t = target.to(torch.int64)
    w = weight.to(acc).contiguous() if weight is not None else None
    table = gamma.to(x.device, non_blocking=True)
    return x, t.contiguous(), w, table


def _block(c, element_size):
    return min(triton.next_power_of_2(c), 4096 if element_size >= 4 else 8192)


@triton_op("calibkernels::focal_loss_forward_triton", mutates_args=())
def focal_loss_forward_triton(input: torch.Tensor, target: torch.Tensor,
                              weight: Optional[torch.Tensor], gamma: torch.Tensor,
                              ignore_index: int, label_smoothing: float, reduction: str,
                              compute_grad: bool, dtype: Optional[torch.dtype] = None
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """calibkernels::focal_loss_forward, computed by the Triton kernel (same arguments, outputs)."""
    prob = _check_focal_loss_args(input, target, weight, gamma, ignore_index, label_smoothing,
                                  reduction)
    x, t, w, table = _prepare(input, target, weight, gamma, prob)
    n, c = x.shape
    acc = _acc_dtype(x.dtype)
    # The mean's divisor, on the device (no host sync): NaN if a target is out of range.
    if prob:
        divisor = torch.full((), float(n), dtype=torch.float64, device=x.device)
    else:
        kept = t != ignore_index
        w_y = w[t.clamp(0, c - 1)].double() if w is not None else \
            torch.ones(n, dtype=torch.float64, device=x.device)
        w_y = torch.where(kept & ((t < 0) | (t >= c)), float("nan"),
                          torch.where(kept, w_y, 0.0))
        divisor = w_y.sum()
    loss_rows = torch.empty(n, dtype=acc, device=x.device)
    grad = torch.empty_like(x, memory_format=torch.contiguous_format) if compute_grad \
        else x.new_empty((0,))
    stats = torch.empty((n if compute_grad else 0, ROW_STATS), dtype=acc, device=x.device)
    if n > 0:
        block = _block(c, x.element_size())
        wrap_triton(tk.focal_loss_forward_kernel)[(n,)](
            x, t, w if w is not None else loss_rows, table, divisor, loss_rows,
            grad if compute_grad else loss_rows, stats if compute_grad else loss_rows, c,
            ignore_index, float(label_smoothing), N_PIECES=(table.numel() - 1) // 2,
            PROB=prob, HAS_WEIGHT=w is not None, HAS_GRAD=compute_grad,
            DENSE=prob or label_smoothing > 0, MEAN=reduction == "mean", MATH_T=_math_t(acc),
            BLOCK_C=block, num_warps=4 if block <= 1024 else 8)
    out_dtype = dtype if dtype is not None else x.dtype
    if reduction == "none":
        return loss_rows.to(out_dtype), grad, stats
    total = loss_rows.sum(dtype=torch.float64)
    if reduction == "mean":
        total = total / divisor
    return total.to(out_dtype), grad, stats


def _launch_backward(out, grad_output, input, target, weight, gamma, stats, ignore_index,
                     label_smoothing, reduction, skip_one):
    prob = _check_focal_loss_args(input, target, weight, gamma, ignore_index, label_smoothing,
                                  reduction)
    x, t, w, _ = _prepare(input, target, weight, gamma, prob)
    n, c = x.shape
    if n == 0:
        return
    go = grad_output.reshape(-1).to(stats.dtype).contiguous()
    block = _block(c, x.element_size())
    wrap_triton(tk.focal_loss_backward_kernel)[(n,)](
        x, t, w if w is not None else stats, stats.contiguous(), go, out, c, ignore_index,
        float(label_smoothing), GO_PER_ROW=reduction == "none", SKIP_ONE=skip_one, PROB=prob,
        HAS_WEIGHT=w is not None, DENSE=prob or label_smoothing > 0,
        MATH_T=_math_t(stats.dtype), BLOCK_C=block, num_warps=4 if block <= 1024 else 8)


@triton_op("calibkernels::focal_loss_backward_triton", mutates_args=())
def focal_loss_backward_triton(grad_output: torch.Tensor, input: torch.Tensor,
                               target: torch.Tensor, weight: Optional[torch.Tensor],
                               gamma: torch.Tensor, stats: torch.Tensor, ignore_index: int,
                               label_smoothing: float, reduction: str) -> torch.Tensor:
    """calibkernels::focal_loss_backward, computed by the Triton kernel."""
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    _launch_backward(out, grad_output, input, target, weight, gamma, stats, ignore_index,
                     label_smoothing, reduction, skip_one=False)
    return out


@torch.library.custom_op("calibkernels::focal_loss_backward_triton_", mutates_args=("grad",))
def focal_loss_backward_triton_(grad: torch.Tensor, grad_output: torch.Tensor,
                                input: torch.Tensor, target: torch.Tensor,
                                weight: Optional[torch.Tensor], gamma: torch.Tensor,
                                stats: torch.Tensor, ignore_index: int, label_smoothing: float,
                                reduction: str) -> None:
    """calibkernels::focal_loss_backward_, computed by the Triton kernel: programs whose
    grad_output is 1 exit at once (read on the device, no host sync)."""
    _launch_backward(grad, grad_output, input, target, weight, gamma, stats, ignore_index,
                     label_smoothing, reduction, skip_one=True)


@focal_loss_backward_triton_.register_fake
def _(grad, grad_output, input, target, weight, gamma, stats, ignore_index, label_smoothing,
      reduction):
    return None


# ---- calibration ----

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
        wrap_triton(tk.calibration_rows_kernel)[(n,)](
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
        wrap_triton(tk.calibration_top_partials_kernel)[(chunks,)](
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
        wrap_triton(tk.calibration_classwise_partials_kernel)[
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


