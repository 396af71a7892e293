"""The compiled ops (schemas and kernels in csrc/) and their fake kernels; the Triton ops load on
first use. Each op is `torch.ops.calibkernels.<name>`; the public functions wrap these."""

import importlib.util

import torch

from . import _C  # noqa: F401  (loading the library registers the ops)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# RowStats in csrc/focal_loss_row.h: the values the forward saves per row for the backward.
ROW_STATS = 7


def _loss_like(input, reduction, dtype):
    shape = (input.shape[0],) if reduction == "none" else ()
    return input.new_empty(shape, dtype=dtype or input.dtype)


@torch.library.register_fake("calibkernels::focal_loss")
def _focal_loss_fake(input, target, weight, gamma, ignore_index, label_smoothing, reduction,
                     backend, dtype=None):
    torch._check(input.dim() == 2, lambda: "focal_loss: input must be 2-D (N, C)")
    return _loss_like(input, reduction, dtype)


def _forward_fake(input, target, weight, gamma, ignore_index, label_smoothing, reduction,
                  compute_grad, dtype=None):
    torch._check(input.dim() == 2, lambda: "focal_loss: input must be 2-D (N, C)")
    n = input.shape[0]
    grad = torch.empty_like(input, memory_format=torch.contiguous_format) if compute_grad \
        else input.new_empty((0,))
    stats = input.new_empty((n if compute_grad else 0, ROW_STATS),
                            dtype=_acc_dtype(input.dtype))
    return _loss_like(input, reduction, dtype), grad, stats


def _backward_fake(grad_output, input, target, weight, gamma, stats, ignore_index,
                   label_smoothing, reduction):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


torch.library.register_fake("calibkernels::focal_loss_forward", _forward_fake)
torch.library.register_fake("calibkernels::focal_loss_backward", _backward_fake)
torch.library.register_fake("calibkernels::focal_loss_backward_",
                            lambda grad, *args: None)

# The differentiable op (autograd and autocast in csrc/focal_loss_autograd.cpp).
focal_loss = torch.ops.calibkernels.focal_loss.default


@torch.library.register_fake("calibkernels::calibration_bins")
def _calibration_bins_fake(input, target, boundaries, mode, ignore_index, classwise, per_sample):
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
            input.new_empty(m, dtype=torch.bool), torch.empty(3, **f64))


@torch.library.register_fake("calibkernels::calibration_sweep")
def _calibration_sweep_fake(logits, target, temperatures, boundaries, ignore_index):
    k, n_bins = temperatures.shape[0], boundaries.shape[0] - 1
    i64 = dict(dtype=torch.int64, device=logits.device)
    f64 = dict(dtype=torch.float64, device=logits.device)
    return (torch.empty(k, n_bins, **i64), torch.empty(k, n_bins, **f64),
            torch.empty(k, n_bins, **i64), torch.empty(k, **f64))


calibration_bins = torch.ops.calibkernels.calibration_bins
calibration_sweep = torch.ops.calibkernels.calibration_sweep


# ---- Triton: the same contract, as triton_ops (calibkernels/triton_ops.py), loaded on first use:
# importing triton takes seconds, which a CPU user should not pay at `import calibkernels` ----

triton = None  # the triton module, once load_triton() has run
_TRITON_FOUND = None
focal_loss_triton = None
calibration_bins_triton = None
calibration_sweep_triton = None


def triton_available() -> bool:
    """Whether triton is installed (found without importing it: that takes seconds)."""
    global _TRITON_FOUND
    if _TRITON_FOUND is None:
        _TRITON_FOUND = importlib.util.find_spec("triton") is not None
    return _TRITON_FOUND


def load_triton():
    """Registers the Triton ops (importing triton) the first time a Triton kernel is used."""
    global triton, focal_loss_triton, calibration_bins_triton, calibration_sweep_triton
    if triton is None:
        from . import triton_ops
        import triton as _triton

        focal_loss_triton = triton_ops.focal_loss_forward_triton
        calibration_bins_triton = triton_ops.calibration_bins_triton
        calibration_sweep_triton = triton_ops.calibration_sweep_triton
        triton = _triton
    return triton
