"""The Triton ops: calibkernels::focal_loss_{forward,backward}_triton with the schemas of the C++
phase ops (csrc/calibkernels.cpp), so that calibkernels::focal_loss's C++ autograd runs them for
backend="triton", and calibration_bins_triton. triton_ops, so that torch.compile sees into the
kernels. Imported on first use (calibkernels.ops.load_triton): importing triton takes seconds.
"""

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.weak import WeakIdKeyDictionary

from . import triton_kernels as tk
from .calibration import NORMS, TRITON_MAX_BINS
from .ops import KERNEL_FLOATS, ROW_STATS, _acc_dtype

REDUCTIONS = ("none", "mean", "sum")


def _math_t(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_focal_loss_args(input, target, weight, gamma, ignore_index, label_smoothing,
                           reduction):
    """The checks of check_focal_loss_args (csrc/calibkernels.cpp) that need no data."""
    if input.dim() != 2 or input.dtype not in KERNEL_FLOATS or input.shape[1] < 1:
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


# The device copies of CPU gamma tables (schedule.gamma_table's are cached, long-lived tensors),
# by table and device, with the table's version: a fixed gamma costs no host-to-device copy after
# the first call, and a table changed in place (through torch: .data and NumPy writes are not
# seen) is copied again. A copy made on one CUDA stream and read on another is waited for and
# marked as used there (the allocator frees it after both). Copies a CUDA graph captured are
# never freed: replays read them.
_DEVICE_TABLES = WeakIdKeyDictionary()
_CAPTURED_TABLES = {}


def _tracing():
    """Whether this call is being traced (a dispatch mode such as FakeTensorMode, or dynamo)."""
    return _get_current_dispatch_mode() is not None or torch.compiler.is_compiling()


def _on_tensor_device(op):
    """Runs op with its first CUDA tensor argument's device current: Triton launches on the
    current device, whatever the tensors' (compiled code sets the device itself)."""
    @functools.wraps(op)
    def run(*args, **kwargs):
        if not _tracing():
            for a in args:
                if isinstance(a, torch.Tensor) and a.is_cuda:
                    with torch.cuda.device(a.device):
                        return op(*args, **kwargs)
        return op(*args, **kwargs)
    return run


def _table_on(gamma, device):
    """The gamma table on `device`, where the kernels read it (asynchronous: no host sync)."""
    if gamma.device == device:
        return gamma
    if type(gamma) is not torch.Tensor or gamma.is_inference() or _tracing():
        # traced (a graph op, never a cached tensor), or a table without a version counter
        return gamma.to(device, non_blocking=True)
    copies = _DEVICE_TABLES.setdefault(gamma, {})
    version, copy, made = copies.get(device, (None, None, None))
    cuda = device.type == "cuda"
    capturing = cuda and torch.cuda.is_current_stream_capturing()
    stream = torch.cuda.current_stream(device) if cuda else None
    if version != gamma._version:
        if capturing:
            raise RuntimeError(
                "calibkernels: under CUDA-graph capture the focal loss's gamma must already be "
                "on the GPU (a host-to-device copy cannot be captured): make one call with the "
                "same gamma (a float, a schedule name or a GammaSchedule) before capturing, as "
                "torch.cuda.graphs' warm-up does, or pass gamma as a CUDA tensor")
        copy = gamma.to(device, non_blocking=True)
        made = (stream, torch.cuda.Event()) if cuda else None
        if cuda:
            made[1].record(stream)
        copies[device] = gamma._version, copy, made
    elif cuda and made[0] != stream:
        if not capturing:  # (torch.cuda.graph synchronises the device before it captures)
            stream.wait_event(made[1])
            copy.record_stream(stream)
    if capturing:
        _CAPTURED_TABLES[id(copy)] = copy
    return copy


def _prepare(input, target, weight, prob):
    """Contiguous operands as the kernels read them: probability targets in the input's dtype or
    the math type, weights in the math type."""
    x = input.contiguous()
    acc = _acc_dtype(x.dtype)
    if prob:
        t = target if target.dtype in (x.dtype, acc) else target.to(acc)
    else:
        t = target.to(torch.int64)
    w = weight.to(acc).contiguous() if weight is not None else None
    return x, t.contiguous(), w


# Elements of a tile per thread, and warps per program, that the sm_90 build holds without
# spilling (tests/test_triton_compile.py holds it), by target kind and element size: a dense
# target keeps three tiles live, a sparse one one; several rows per program add per-row values;
# 16 warps cap a thread at 128 registers. A row of up to warps x 32 x PER_THREAD classes is read
# once into registers; a longer one streams in STREAM_BLOCK pieces.
PER_THREAD = {("sparse", 2): 64, ("sparse", 4): 32, ("sparse", 8): 16, ("dense", 2): 16,
              ("dense", 4): 16, ("dense", 8): 8, ("rows", 2): 4, ("rows", 4): 4, ("rows", 8): 2}
MAX_WARPS = {("sparse", 2): 16, ("sparse", 4): 16, ("sparse", 8): 8, ("dense", 2): 8,
             ("dense", 4): 8, ("dense", 8): 8}
STREAM_BLOCK = {2: 8192, 4: 4096, 8: 2048}
MAX_ROWS = 32  # rows per program when several short rows share one


def _row_align(c):
    return min(c & -c, 16)  # the largest power of two dividing C, up to 16


def focal_layout(n, c, dtype, dense):
    """(rows per program, BLOCK_C, SINGLE, num_warps) for an (n, c) focal loss in `dtype`."""
    kind = "dense" if dense else "sparse", dtype.itemsize
    max_warps, per_thread = MAX_WARPS[kind], PER_THREAD[kind]
    block = triton.next_power_of_2(c)
    if block > 32 * max_warps * per_thread:  # streamed: one row per program
        return 1, STREAM_BLOCK[dtype.itemsize], False, 8
    rows_tile = 32 * max_warps * min(per_thread, PER_THREAD["rows", dtype.itemsize])
    rows = max(1, min(rows_tile // block, MAX_ROWS, triton.next_power_of_2(max(n, 1))))
    if rows > 1:
        per_thread = min(per_thread, PER_THREAD["rows", dtype.itemsize])
    tile, vector = rows * block, 16 // dtype.itemsize  # 16-byte accesses need that many a thread
    warps = min(max_warps, max(4, triton.next_power_of_2(triton.cdiv(tile, 32 * per_thread))))
    return rows, block, True, max(1, min(warps, tile // (32 * vector)))


def calibration_layout(n, c, dtype):
    """(rows per program, BLOCK_C, num_warps) of calibration_rows_kernel: rows stream in pieces
    of up to 4096 classes; short rows share a program, up to MAX_ROWS of them."""
    block = min(triton.next_power_of_2(c), 4096)
    rows = max(1, min(2048 // block, MAX_ROWS, triton.next_power_of_2(max(n, 1))))
    tile, vector = rows * block, 16 // dtype.itemsize
    per_thread = 8 if dtype.itemsize == 8 else 16  # no spills on sm_90 (test_triton_compile.py)
    warps = min(8, max(4, triton.next_power_of_2(triton.cdiv(tile, 32 * per_thread))))
    return rows, block, max(1, min(warps, tile // (32 * vector)))


@triton_op("calibkernels::focal_loss_forward_triton", mutates_args=())
@_on_tensor_device
def focal_loss_forward_triton(input: torch.Tensor, target: torch.Tensor,
                              weight: Optional[torch.Tensor], gamma: torch.Tensor,
                              ignore_index: int, label_smoothing: float, reduction: str,
                              compute_grad: bool, dtype: Optional[torch.dtype] = None,
                              compute_stats: bool = False
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """calibkernels::focal_loss_forward, computed by the Triton kernel (same arguments, outputs)."""
    prob = _check_focal_loss_args(input, target, weight, gamma, ignore_index, label_smoothing,
                                  reduction)
    x, t, w = _prepare(input, target, weight, prob)
    table = _table_on(gamma, x.device)
    n, c = x.shape
    acc = _acc_dtype(x.dtype)
    dev = x.device
    out_dtype = dtype if dtype is not None else x.dtype
    mean, reduce = reduction == "mean", reduction != "none"
    # The mean's divisor in parts, on the device (no host sync): N for probability targets.
    parts = torch.empty(tk.DIVISOR_PART_COUNT if mean and not prob else 1, dtype=torch.float64,
                        device=dev)
    if mean and not prob:
        wrap_triton(tk.focal_loss_divisor_kernel)[(tk.DIVISOR_PART_COUNT,)](
            t, w if w is not None else parts, parts, n, c, ignore_index, HAS_WEIGHT=w is not None,
            BLOCK=1024, num_warps=4)
    dense = prob or label_smoothing > 0
    rows, block, single, warps = focal_layout(n, c, x.dtype, dense)
    programs = triton.cdiv(n, rows)
    # per-row losses in the loss's dtype, or each program's float64 sum of its rows' losses
    loss = torch.empty(max(programs, 1), dtype=torch.float64, device=dev) if reduce else \
        torch.empty(n, dtype=out_dtype, device=dev)
    grad = torch.empty_like(x, memory_format=torch.contiguous_format) if compute_grad \
        else x.new_empty((0,))
    with_stats = compute_grad or compute_stats
    stats = torch.empty((n if with_stats else 0, ROW_STATS), dtype=acc, device=dev)
    if n > 0:
        wrap_triton(tk.focal_loss_forward_kernel)[(programs,)](
            x, t, w if w is not None else loss, table, parts, loss,
            grad if compute_grad else loss, stats if with_stats else loss, n, c,
            ignore_index, float(label_smoothing), N_PIECES=(table.numel() - 1) // 2,
            PROB=prob, HAS_WEIGHT=w is not None, HAS_GRAD=compute_grad, HAS_STATS=with_stats,
            DENSE=dense, MEAN=mean, REDUCE=reduce, MATH_T=_math_t(acc), ROWS=rows, BLOCK_C=block,
            SINGLE=single, ROW_ALIGN=_row_align(c), num_warps=warps)
    if not reduce:
        return loss, grad, stats
    total = torch.empty((), dtype=out_dtype, device=dev)
    wrap_triton(tk.focal_loss_finish_kernel)[(1,)](
        loss, programs if n > 0 else 0, parts, total, n, MEAN=mean, PROB=prob, BLOCK=4096,
        num_warps=8)
    return total, grad, stats


def _launch_backward(out, grad_output, input, target, weight, gamma, stats, ignore_index,
                     label_smoothing, reduction, skip_one):
    prob = _check_focal_loss_args(input, target, weight, gamma, ignore_index, label_smoothing,
                                  reduction)
    x, t, w = _prepare(input, target, weight, prob)  # the gradient phase needs no gamma table
    n, c = x.shape
    per_row = reduction == "none"
    if grad_output.numel() != (n if per_row else 1) or grad_output.device != x.device:
        raise ValueError(f"focal_loss_backward: grad_output must have {n if per_row else 1} "
                         f"values on {x.device}, got shape {tuple(grad_output.shape)} on "
                         f"{grad_output.device}")
    if n == 0:
        return
    go = grad_output.reshape(-1)  # read in its dtype and stride by the kernel: no copy
    if _tracing():
        go = go.contiguous()  # traced: the stride seen now need not be the one that runs
    dense = prob or label_smoothing > 0
    rows, block, _, warps = focal_layout(n, c, x.dtype, dense)
    wrap_triton(tk.focal_loss_backward_kernel)[(triton.cdiv(n, rows),)](
        x, t, w if w is not None else stats, stats.contiguous(), go, out, n, c, ignore_index,
        go.stride(0), float(label_smoothing), GO_PER_ROW=per_row, SKIP_ONE=skip_one,
        PROB=prob, HAS_WEIGHT=w is not None, DENSE=dense, MATH_T=_math_t(stats.dtype), ROWS=rows,
        BLOCK_C=block, ROW_ALIGN=_row_align(c), num_warps=warps)


@triton_op("calibkernels::focal_loss_backward_triton", mutates_args=())
@_on_tensor_device
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
@_on_tensor_device
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

def _check_calibration_args(input, target, boundaries):
    if input.dim() != 2 or input.dtype not in KERNEL_FLOATS or input.shape[1] < 1:
        raise ValueError(f"calibration: logits / probabilities must be 2-D (N, C) floating, got "
                         f"{input.dtype} of shape {tuple(input.shape)}")
    if target.dtype not in (torch.int64, torch.uint8) or tuple(target.shape) != (input.shape[0],):
        raise ValueError(f"calibration: target must hold class indices (int64 or uint8) of "
                         f"shape ({input.shape[0]},)")
    if boundaries.dtype != torch.float32 or boundaries.dim() != 1 or boundaries.numel() < 2:
        raise ValueError("calibration: boundaries must be float32 of shape (n_bins + 1)")
    if boundaries.numel() - 1 > TRITON_MAX_BINS:  # the bins are tiles in registers
        raise ValueError(f"calibration: calibkernels' Triton kernels take n_bins <= "
                         f"{TRITON_MAX_BINS}, got {boundaries.numel() - 1}; use backend='cuda' "
                         f"(or 'auto'), which takes any n_bins")


def classwise_layout(c, n_bins):
    """(classes a program, rows a step) of the classwise kernel: its three (classes, bins)
    accumulators stay about 512 values (32 classes at 16 bins; 32 at 100 bins spilled 10 KB a
    thread), with at most 65535 programs over the classes."""
    nb = triton.next_power_of_2(n_bins)
    block_k = max(1, min(32, 512 // nb), triton.next_power_of_2(triton.cdiv(c, 65535)))
    return block_k, max(1, min(16, 1024 // nb))


def _classwise(x, t, samples, beta, from_logits, ignore_index):
    n, c = x.shape
    n_bins = beta.numel() - 1
    nb = triton.next_power_of_2(n_bins)
    dev = x.device
    block_k, block_r = classwise_layout(c, n_bins)
    chunks = max(1, min(triton.cdiv(n, 256), (1 << 22) // (c * n_bins)))
    rows_per_chunk = triton.cdiv(max(n, 1), chunks)
    part = (torch.zeros(chunks, c, n_bins, dtype=torch.int64, device=dev),
            torch.zeros(chunks, c, n_bins, dtype=torch.float64, device=dev),
            torch.zeros(chunks, c, n_bins, dtype=torch.int64, device=dev))
    if n > 0:
        wrap_triton(tk.calibration_classwise_partials_kernel)[(chunks, triton.cdiv(c, block_k))](
            x, t, samples, beta, *part, n, c, ignore_index, rows_per_chunk,
            FROM_LOGITS=from_logits, MATH_T=_math_t(samples.dtype), N_BINS=n_bins, NB=nb,
            BLOCK_R=block_r, BLOCK_K=block_k)
    return tuple(q.sum(0) for q in part)


@triton_op("calibkernels::calibration_bins_triton", mutates_args=())
@_on_tensor_device
def calibration_bins_triton(
        input: torch.Tensor, target: torch.Tensor, boundaries: torch.Tensor, mode: int,
        ignore_index: int, classwise: bool, per_sample: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """calibkernels::calibration_bins, computed by the Triton kernels (same outputs). The rows
    are read once for the top-label state, Brier and NLL; the classwise state reads them again.
    mode -1 forms both readings and picks one on the device (no host synchronisation)."""
    _check_calibration_args(input, target, boundaries)
    if mode not in (-1, 0, 1):
        raise ValueError(f"calibration: mode must be 1 (logits), 0 (probabilities) or -1 (auto), "
                         f"got {mode}")
    x, t, beta = input.contiguous(), target.to(torch.int64).contiguous(), boundaries.contiguous()
    n, c = x.shape
    n_bins = beta.numel() - 1
    acc = _acc_dtype(x.dtype)
    dev = x.device
    samples = torch.empty(n, tk.N_SAMPLE_COLS, dtype=acc, device=dev)
    correct = torch.empty(n, dtype=torch.bool, device=dev)
    inside = torch.empty(n, dtype=torch.bool, device=dev)
    ticket = torch.empty((), dtype=torch.int32, device=dev)
    rows, block, warps = calibration_layout(n, c, x.dtype)
    wrap_triton(tk.calibration_rows_kernel)[(max(1, triton.cdiv(n, rows)),)](  # zeroes the ticket
        x, t, samples, correct, inside, ticket, n, c, ignore_index, MATH_T=_math_t(acc),
        ROWS=rows, BLOCK_C=block, ROW_ALIGN=_row_align(c), num_warps=warps)
    # The top-label state, Brier, NLL, the reading and the errors: one launch (mode -1 forms both
    # readings and keeps one on the device: no host synchronisation).
    readings = 2 if mode == -1 else 1
    nb = triton.next_power_of_2(n_bins)
    block_r = max(16, min(1024, 8192 // nb))
    chunks = max(1, triton.cdiv(n, block_r))
    part = (torch.empty(chunks * readings, n_bins, dtype=torch.int64, device=dev),
            torch.empty(chunks * readings, n_bins, dtype=torch.float64, device=dev),
            torch.empty(chunks * readings, n_bins, dtype=torch.int64, device=dev),
            torch.empty(chunks * readings, 2, dtype=torch.float64, device=dev),
            torch.empty(chunks if readings == 2 else 0, dtype=torch.int32, device=dev))
    counts = torch.empty(n_bins, dtype=torch.int64, device=dev)
    conf_sums = torch.empty(n_bins, dtype=torch.float64, device=dev)
    hits = torch.empty(n_bins, dtype=torch.int64, device=dev)
    totals = torch.empty(3 + len(NORMS), dtype=torch.float64, device=dev)
    wrap_triton(tk.calibration_top_kernel)[(chunks,)](
        samples, correct, t, inside, beta, *part, ticket, counts, conf_sums, hits, totals, n,
        ignore_index, FIRST=tk.CONF_P if mode == 0 else tk.CONF_L, READINGS=readings,
        N_BINS=n_bins, NB=nb, BLOCK_R=block_r, BLOCK_CH=max(1, 1024 // nb))
    cw_rows = c if classwise else 0
    cw = [(torch.zeros(cw_rows, n_bins, dtype=torch.int64, device=dev),
           torch.zeros(cw_rows, n_bins, dtype=torch.float64, device=dev),
           torch.zeros(cw_rows, n_bins, dtype=torch.int64, device=dev))]
    conf = [samples[:0, tk.CONF_L]]
    from_logits = {1: [True], 0: [False], -1: [True, False]}[mode]
    if classwise:
        cw = [_classwise(x, t, samples, beta, f, ignore_index) for f in from_logits]
    if per_sample:
        conf = [samples[:, tk.CONF_L if f else tk.CONF_P] for f in from_logits]
    if mode == -1 and (classwise or per_sample):
        probs = totals[2] > 0.5  # the reading the top kernel kept, on the device
        cw = [tuple(torch.where(probs, p, l) for l, p in zip(*cw))] if classwise else cw
        conf = [torch.where(probs, conf[1], conf[0])] if per_sample else conf
    if per_sample:  # an ignored row: 0 and not correct, as on every backend
        conf = [conf[0].masked_fill(t == ignore_index, 0.0)]
        correct = correct & (t != ignore_index)
    # a NaN confidence (a NaN or +inf logit, a poisoned reading) is never correct
    correct = correct & ~conf[0].isnan() if per_sample else correct[:0].clone()
    return (counts, conf_sums, hits, *cw[0], conf[0].contiguous(), correct, totals)


@triton_op("calibkernels::calibration_sweep_triton", mutates_args=())
@_on_tensor_device
def calibration_sweep_triton(logits: torch.Tensor, target: torch.Tensor,
                             temperatures: torch.Tensor, boundaries: torch.Tensor,
                             ignore_index: int
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """calibkernels::calibration_sweep, computed by the Triton kernels: each row read once for
    all K temperatures."""
    _check_calibration_args(logits, target, boundaries)
    k = temperatures.numel()
    if temperatures.dim() != 1 or not 1 <= k <= 256:
        raise ValueError("calibration_sweep: temperatures must be 1-D, 1 to 256 values")
    # on the device (or traced) they are checked in the kernel: a bad T gives NaN, never a number
    if temperatures.device.type == "cpu" and not _tracing():
        bad = ~(torch.isfinite(temperatures) & (temperatures > 0))
        if bad.any():
            raise ValueError("calibration_sweep: temperatures must be finite and > 0, got "
                             f"{temperatures[bad][0].item()}")
    x, t, beta = logits.contiguous(), target.to(torch.int64).contiguous(), boundaries.contiguous()
    n, c = x.shape
    n_bins = beta.numel() - 1
    nb = triton.next_power_of_2(n_bins)
    acc = _acc_dtype(x.dtype)
    dev = x.device
    temps = temperatures.to(device=dev, dtype=torch.float64, non_blocking=True).contiguous()
    conf = torch.empty(n, k, dtype=acc, device=dev)
    nll = torch.empty(n, k, dtype=acc, device=dev)
    correct = torch.empty(n, dtype=torch.bool, device=dev)
    block_t = max(16, triton.next_power_of_2(k))
    block_c = max(16, min(triton.next_power_of_2(c), 8192 // block_t))
    block_r = max(16, min(1024, 8192 // nb))
    chunks = max(1, triton.cdiv(n, block_r))
    part = (torch.zeros(chunks, k, n_bins, dtype=torch.int64, device=dev),
            torch.zeros(chunks, k, n_bins, dtype=torch.float64, device=dev),
            torch.zeros(chunks, k, n_bins, dtype=torch.int64, device=dev),
            torch.zeros(chunks, k, dtype=torch.float64, device=dev))
    if n > 0:
        wrap_triton(tk.calibration_sweep_rows_kernel)[(n,)](
            x, t, temps, conf, nll, correct, c, ignore_index, k, MATH_T=_math_t(acc),
            BLOCK_T=block_t, BLOCK_C=block_c, num_warps=8)
        wrap_triton(tk.calibration_sweep_partials_kernel)[(chunks, k)](
            conf, nll, correct, t, beta, *part, n, k, ignore_index, N_BINS=n_bins, NB=nb,
            BLOCK_R=block_r)
    return tuple(q.sum(0) for q in part)
