"""Softmax focal loss (Mukhoti et al., NeurIPS 2020): the functional form and the nn.Module."""

import os

import torch
from torch import nn
from torch.nn import _reduction

from . import ops, reference
from .schedule import as_schedule

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")


# backend="auto" on CUDA follows bench/results/2026-11-23-h100 (H100, median ms): the Triton
# kernels win once a row is long, the CUDA C++ ones below. Focal loss fwd+bwd from 4000 bytes a row
# (65536x1000 fp32: Triton 0.76 vs CUDA 0.90; bf16, 2000 bytes: CUDA 0.54 vs 0.68); ECE from 128 KiB
# (8192x128256 bf16: Triton 0.92 vs CUDA 1.74; 8192x32000 fp32, 125 KiB: CUDA 0.58 vs 0.86).
TRITON_FROM_ROW_BYTES = {"focal_loss": 4000, "calibration": 2**17}


def resolve_backend(backend: str, device: torch.device, what: str = "focal_loss",
                    row_bytes: int = 0) -> str:
    """The backend that runs: "cpu" / "cuda" are the C++ kernels of that device, "triton" the
    Triton kernel, "torch" the eager reference. "auto" takes the C++ kernel on the CPU and, on
    CUDA, whichever of CUDA C++ and Triton measured faster for rows of ``row_bytes`` (C·bytes)."""
    if backend == "auto":
        if device.type == "cuda":
            long_rows = row_bytes >= TRITON_FROM_ROW_BYTES[what]
            return "triton" if long_rows and ops.triton is not None else "cuda"
        return device.type if device.type == "cpu" else "torch"
    if backend in ("cpu", "cuda") and device.type != backend:
        raise ValueError(f"{what}: backend={backend!r} needs {backend} tensors, "
                         f"got them on {device}")
    if backend == "triton":
        if ops.triton is None:
            raise ValueError(f"{what}: backend='triton' needs triton, which is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{what}: backend='triton' needs CUDA tensors (or "
                             f"TRITON_INTERPRET=1 for CPU tensors), got them on {device}")
    return backend


def _check_inputs(logits, target, weight, reduction, label_smoothing, backend):
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError("focal_loss: logits and target must be tensors")
    if not logits.is_floating_point():
        raise ValueError(f"focal_loss: logits must be float32, float16, bfloat16 or float64, "
                         f"got {logits.dtype}")
    if target.is_floating_point():
        raise ValueError(f"focal_loss: target must hold int64 class indices, got {target.dtype} "
                         f"(class-probability targets are not supported)")
    if target.dtype != torch.int64:
        raise ValueError(f"focal_loss: target must hold int64 class indices, got {target.dtype}")
    if logits.dim() == 0:
        raise ValueError("focal_loss: logits must have a class dimension")
    batched = logits.dim() >= 2
    expected = (logits.shape[0],) + tuple(logits.shape[2:]) if batched else ()
    if tuple(target.shape) != expected:
        raise ValueError(f"focal_loss: target must have shape {expected} for logits of shape "
                         f"{tuple(logits.shape)}, got {tuple(target.shape)}")
    n_classes = logits.shape[1] if batched else logits.shape[0]
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise ValueError("focal_loss: weight must be a floating tensor of shape (C,)")
        if tuple(weight.shape) != (n_classes,):
            raise ValueError(f"focal_loss: weight must have shape ({n_classes},), "
                             f"got {tuple(weight.shape)}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError("focal_loss: no gradient flows to weight; pass weight.detach()")
    if reduction not in reference.REDUCTIONS:
        raise ValueError(f"focal_loss: reduction must be one of {reference.REDUCTIONS}, "
                         f"got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"focal_loss: label_smoothing must be in [0, 1], got {label_smoothing}")
    if backend not in BACKENDS:
        raise ValueError(f"focal_loss: backend must be one of {BACKENDS}, got {backend!r}")


def focal_loss(logits, target, gamma=3.0, *, weight=None, ignore_index=-100, reduction="mean",
               label_smoothing=0.0, backend="auto"):
    """Softmax focal loss, a drop-in for ``F.cross_entropy`` (gamma=0 gives exactly that).

    loss_i = -sum_k t_k w_k (1 - p_k)^gamma_i log p_k, with p = softmax(logits_i) and t the
    (label-smoothed) one-hot target. ``gamma`` is a float >= 0, "flsd-53", "flsd-532" or a
    GammaSchedule. ``logits`` is (N, C) or (N, C, d1, ..., dk); ``target`` holds int64 class
    indices of shape (N) or (N, d1, ..., dk). ``backend`` is "auto", "cpu" or "cuda" (the fused
    C++ kernels), "triton" (the fused Triton kernel) or "torch" (the eager reference).
    """
    _check_inputs(logits, target, weight, reduction, label_smoothing, backend)
    schedule = as_schedule(gamma)
    n_classes = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
    backend = resolve_backend(backend, logits.device, row_bytes=n_classes * logits.element_size())
    if backend == "torch":
        return reference.focal_loss(logits, target, schedule, weight=weight,
                                    ignore_index=ignore_index, reduction=reduction,
                                    label_smoothing=label_smoothing)
    out_shape = target.shape
    if logits.dim() == 1:
        logits, target = logits.unsqueeze(0), target.unsqueeze(0)
    rows = logits.movedim(1, -1).reshape(-1, n_classes) if logits.dim() > 2 else logits
    op = ops.focal_loss_triton if backend == "triton" else ops.focal_loss
    loss, _ = op(rows, target.reshape(-1), weight, list(schedule.thresholds),
                             list(schedule.gammas), schedule.default, int(ignore_index),
                             float(label_smoothing), reduction,
                             torch.is_grad_enabled() and logits.requires_grad)
    if reduction == "none":
        loss = loss.reshape(out_shape)
    return loss.to(logits.dtype)


class FocalLoss(nn.modules.loss._WeightedLoss):
    """nn.CrossEntropyLoss's constructor plus ``gamma``: a float, "flsd-53", "flsd-532" or a
    GammaSchedule (see :func:`focal_loss`)."""

    __constants__ = ["ignore_index", "reduction", "label_smoothing"]

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, gamma=3.0, backend="auto"):
        if size_average is not None or reduce is not None:
            reduction = _reduction.legacy_get_string(size_average, reduce)
        super().__init__(weight, None, None, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.gamma = as_schedule(gamma)  # validate now, not at the first batch
        self.backend = backend

    def forward(self, input, target):
        return focal_loss(input, target, self.gamma, weight=self.weight,
                          ignore_index=self.ignore_index, reduction=self.reduction,
                          label_smoothing=self.label_smoothing, backend=self.backend)

    def extra_repr(self):
        return (f"gamma={self.gamma}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}")
