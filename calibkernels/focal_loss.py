"""Softmax focal loss (Mukhoti et al., NeurIPS 2020): the functional form and the nn.Module, with
F.cross_entropy's signature (CONTRACT §1) plus the keyword-only ``gamma`` and ``backend``."""

import os

import torch
from torch import nn
from torch.nn import _reduction

from . import ops, reference
from .schedule import as_schedule, gamma_table

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
REDUCTIONS = ("none", "mean", "sum")

# backend="auto" on CUDA follows bench/results/2026-11-23-h100 (H100, median ms): the Triton
# kernels win once a row is long, the CUDA C++ ones below. Focal loss fwd+bwd from 4000 bytes a row
# (65536x1000 fp32: Triton 0.76 vs CUDA 0.90; bf16, 2000 bytes: CUDA 0.54 vs 0.68); ECE from 128 KiB
# (8192x128256 bf16: Triton 0.92 vs CUDA 1.74; 8192x32000 fp32, 125 KiB: CUDA 0.58 vs 0.86).
# bench/auto_backend.py derives them from a run; tests/test_auto_backend.py holds them to the
# newest run committed.
TRITON_FROM_ROW_BYTES = {"focal_loss": 4000, "calibration": 2**17}


def resolve_backend(backend: str, device: torch.device, what: str = "focal_loss",
                    row_bytes: int = 0) -> str:
    """The backend that runs: "cpu" / "cuda" are the C++ kernels of that device, "triton" the
    Triton kernel, "torch" the eager reference. "auto" takes the C++ kernel on the CPU and, on
    CUDA, whichever of CUDA C++ and Triton measured faster for rows of ``row_bytes`` (C·bytes)."""
    if backend == "auto":
        if device.type == "cuda":
            long_rows = row_bytes >= TRITON_FROM_ROW_BYTES[what]
            return "triton" if long_rows and ops.triton_available() else "cuda"
        return device.type if device.type == "cpu" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{what}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("cpu", "cuda") and device.type != backend:
        raise ValueError(f"{what}: backend={backend!r} needs {backend} tensors, "
                         f"got them on {device}")
    if backend == "triton":
        if not ops.triton_available():
            raise ValueError(f"{what}: backend='triton' needs triton, which is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{what}: backend='triton' needs CUDA tensors (or "
                             f"TRITON_INTERPRET=1 for CPU tensors), got them on {device}")
    return backend


def _as_rows(input, target, prob_target):
    """(N, C, d1, ..., dk) or (C,) input and its target as 2-D rows (N·d1···dk, C) and (N·...) /
    (N·..., C), and the shape of a per-sample loss."""
    if input.dim() == 0:
        raise ValueError("focal_loss: input must have a class dimension")
    batched = input.dim() >= 2
    c = input.shape[1] if batched else input.shape[0]
    sample_shape = (input.shape[0],) + tuple(input.shape[2:]) if batched else ()
    expected = tuple(input.shape) if prob_target else sample_shape
    if tuple(target.shape) != expected:
        kind = "class probabilities" if prob_target else "class indices"
        raise ValueError(f"focal_loss: target ({kind}) must have shape {expected} for input of "
                         f"shape {tuple(input.shape)}, got {tuple(target.shape)}")
    if not batched:
        return input.unsqueeze(0), target.unsqueeze(0), sample_shape
    rows = input.movedim(1, -1).reshape(-1, c)
    target = target.movedim(1, -1).reshape(-1, c) if prob_target else target.reshape(-1)
    return rows, target, sample_shape


def focal_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
               reduction="mean", label_smoothing=0.0, *, gamma=3.0, backend="auto"):
    """Softmax focal loss, a drop-in for ``F.cross_entropy`` (``gamma=0`` gives exactly that).

    loss_i = -sum_k t_k w_k (1 - p_k)^gamma_i log p_k, with p = softmax(input_i) and t the
    (label-smoothed) target distribution. The arguments are ``F.cross_entropy``'s, in its order:
    ``input`` (N, C), (N, C, d1, ..., dk) or (C,); ``target`` class indices (int64 or uint8) of
    shape (N) or (N, d1, ..., dk), or class probabilities of the input's shape; ``weight`` (C);
    ``ignore_index``, ``reduction``, ``label_smoothing`` (and the deprecated ``size_average`` /
    ``reduce``). Keyword-only: ``gamma``, a float >= 0 (a NumPy scalar or a 0-d tensor too),
    "flsd-53", "flsd-532" or a GammaSchedule; with probability targets an adaptive gamma is chosen
    from sum_k t_k p_k. ``backend``: "auto", "cpu" / "cuda" (the fused C++ kernels), "triton"
    (the fused Triton kernels) or "torch" (the eager reference).

    The loss has the input's dtype, float32 under ``torch.autocast`` (as F.cross_entropy's).
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError("focal_loss: input and target must be tensors")
    ops.check_float(input, "focal_loss: input")
    if target.is_floating_point():
        ops.check_float(target, "focal_loss: class-probability target")
    if reduction not in REDUCTIONS:
        raise ValueError(f"focal_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    table = gamma_table(gamma)
    if backend == "auto" and input.is_cpu:  # the common case, without the general resolution
        kernel = "cpu"
    else:
        c = input.shape[1] if input.dim() >= 2 else input.shape[-1] if input.dim() else 0
        kernel = resolve_backend(backend, input.device, row_bytes=c * input.element_size())
    if kernel == "torch":
        return reference.focal_loss(input, target, weight, ignore_index=ignore_index,
                                    reduction=reduction, label_smoothing=label_smoothing,
                                    gamma=gamma)
    if kernel == "triton":
        ops.load_triton()
    if input.dim() == 2 and target.dim() <= 2:
        return ops.focal_loss(input, target, weight, table, ignore_index, label_smoothing,
                              reduction, "triton" if kernel == "triton" else "native")
    prob_target = target.is_floating_point()
    rows, target_rows, sample_shape = _as_rows(input, target, prob_target)
    loss = ops.focal_loss(rows, target_rows, weight, table, ignore_index, label_smoothing,
                          reduction, "triton" if kernel == "triton" else "native")
    return loss.reshape(sample_shape) if reduction == "none" else loss


class FocalLoss(nn.modules.loss._WeightedLoss):
    """``nn.CrossEntropyLoss``'s constructor, in its order, plus the keyword-only ``gamma`` (a
    float, "flsd-53", "flsd-532" or a GammaSchedule) and ``backend`` (see :func:`focal_loss`)."""

    __constants__ = ["ignore_index", "reduction", "label_smoothing"]

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, gamma=3.0, backend="auto"):
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        gamma_table(gamma)  # validate now, not at the first batch
        self.gamma = as_schedule(gamma) if isinstance(gamma, str) else gamma
        self.backend = backend

    def forward(self, input, target):
        return focal_loss(input, target, self.weight, ignore_index=self.ignore_index,
                          reduction=self.reduction, label_smoothing=self.label_smoothing,
                          gamma=self.gamma, backend=self.backend)

    def extra_repr(self):
        return (f"gamma={self.gamma}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}")
