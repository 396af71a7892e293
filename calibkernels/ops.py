"""The compiled ops (schemas and kernels in csrc/) and their fake kernels; the Triton ops load on
first use. Each op is `torch.ops.calibkernels.<name>`; the public functions wrap these."""

import importlib.util

import torch



def _torch_build(version, cuda):
    """What an extension must match: torch's major.minor and its CUDA major (or no CUDA)."""
    major_minor = ".".join(version.split("+")[0].split(".")[:2])
    return major_minor, None if cuda is None else cuda.split(".")[0]


def _describe(version, cuda):
    return f"torch {version} ({'CUDA ' + cuda if cuda else 'CPU only'})"


def _load_extension():
    """Imports calibkernels._C (which registers the ops), or raises an ImportError that says what
    it was built against, what is installed, and how to rebuild: never a bare loader error."""
    fix = ("rebuild calibkernels against the installed torch: pip install --no-build-isolation "
           "--force-reinstall --no-deps <the calibkernels source folder>")
    try:
        from . import _build_info as built
    except ImportError:
        raise ImportError("calibkernels' compiled extension is missing (this looks like a source "
                          "checkout that was never built): pip install --no-build-isolation -e . "
                          "(or make build)") from None
    installed = (torch.__version__, torch.version.cuda)
    if _torch_build(built.TORCH_VERSION, built.TORCH_CUDA) != _torch_build(*installed):
        raise ImportError(f"calibkernels was built against "
                          f"{_describe(built.TORCH_VERSION, built.TORCH_CUDA)}, but "
                          f"{_describe(*installed)} is installed; {fix}")
    try:
        from . import _C  # noqa: F401  (loading the library registers the ops)
    except (ImportError, OSError) as e:
        raise ImportError(f"calibkernels' extension failed to load ({e}); it was built against "
                          f"{_describe(built.TORCH_VERSION, built.TORCH_CUDA)} and "
                          f"{_describe(*installed)} is installed; {fix}") from e


_load_extension()


def cpu_capability() -> str:
    """The instruction set the CPU kernels run with now: "AVX512", "AVX2" or "DEFAULT" — the
    widest this CPU has among those built, lowered by CALIBKERNELS_CPU_CAPABILITY (or by torch's
    ATEN_CPU_CAPABILITY), read at every call."""
    return torch.ops.calibkernels.cpu_capability()


# The floating types every kernel has (float8 and complex have none).
KERNEL_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float(tensor: torch.Tensor, what: str) -> None:
    if tensor.dtype not in KERNEL_FLOATS:
        raise ValueError(f"{what} must be float32, float16, bfloat16 or float64, got "
                         f"{tensor.dtype}: calibkernels has no kernel for it (convert with "
                         f".float())")


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
                  compute_grad, dtype=None, compute_stats=False):
    torch._check(input.dim() == 2, lambda: "focal_loss: input must be 2-D (N, C)")
    n = input.shape[0]
    grad = torch.empty_like(input, memory_format=torch.contiguous_format) if compute_grad \
        else input.new_empty((0,))
    stats = input.new_empty((n if compute_grad or compute_stats else 0, ROW_STATS),
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


# The phases over a window of classes (csrc/cpu/focal_loss_phases_cpu.cpp).
@torch.library.register_fake("calibkernels::focal_loss_partial_stats")
def _partial_stats_fake(input, target, class_offset, ignore_index):
    return input.new_empty((input.shape[0], 4), dtype=_acc_dtype(input.dtype))


@torch.library.register_fake("calibkernels::focal_loss_partial_sums")
def _partial_sums_fake(input, target, gamma, row_stats, class_offset, n_classes, ignore_index,
                       label_smoothing):
    return input.new_empty((input.shape[0], 2), dtype=_acc_dtype(input.dtype))


@torch.library.register_fake("calibkernels::focal_loss_finish")
def _finish_fake(row_stats, sums, target, gamma, n_classes, ignore_index, label_smoothing,
                 reduction):
    n = row_stats.shape[0]
    return _loss_like(row_stats, reduction, row_stats.dtype), row_stats.new_empty((n, ROW_STATS))


@torch.library.register_fake("calibkernels::focal_loss_window_grad")
def _window_grad_fake(grad_output, input, target, stats, class_offset, n_classes, ignore_index,
                      label_smoothing, reduction):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


focal_loss_partial_stats = torch.ops.calibkernels.focal_loss_partial_stats.default
focal_loss_partial_sums = torch.ops.calibkernels.focal_loss_partial_sums.default
focal_loss_finish = torch.ops.calibkernels.focal_loss_finish.default
focal_loss_window_grad = torch.ops.calibkernels.focal_loss_window_grad.default


torch.library.register_fake("calibkernels::scale_unless_one_", lambda t, scale: None)
scale_unless_one_ = torch.ops.calibkernels.scale_unless_one_.default


def focal_loss_forward_op(kernel):
    """The forward phase op of a backend: the C++ kernels' ("cpu", "cuda") or Triton's."""
    if kernel == "triton":
        load_triton()
        return torch.ops.calibkernels.focal_loss_forward_triton.default
    return torch.ops.calibkernels.focal_loss_forward.default


def focal_loss_backward_op(kernel):
    """The gradient phase op of a backend."""
    if kernel == "triton":
        load_triton()
        return torch.ops.calibkernels.focal_loss_backward_triton.default
    return torch.ops.calibkernels.focal_loss_backward.default


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
            input.new_empty(m, dtype=torch.bool), torch.empty(6, **f64))


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
