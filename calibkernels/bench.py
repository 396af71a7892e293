"""`python -m calibkernels bench`: fused vs eager reference vs torch.compile (focal loss forward +
backward) and vs torchmetrics (ECE) at the standard shapes of this device (CPU: 8192 x 1000,
65536 x 100, 1024 x 32000 float32; CUDA: 65536 x 10 ... 4096 x 262144 bfloat16).

The implementations are timed in alternation, round after round, and each speed-up is the median
of the per-round ratios: on a noisy machine that is steadier than comparing medians taken
minutes apart. The pytest-benchmark suites in bench/ (and bench/gpu_suite.sh on a GPU) are the
detailed tool.
"""

import statistics
import time

import torch

from . import reference
from ._optional import require
from .calibration import ece
from .focal_loss import focal_loss

CPU_SHAPES = [(8192, 1000), (65536, 100), (1024, 32000)]
GPU_SHAPES = [(65536, 10), (65536, 100), (65536, 1000), (8192, 32000), (8192, 128256),
              (4096, 262144)]


def _time(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def compare(impls, rounds, device, traffic):
    """Times impls (name -> fn) in alternation; returns a line of ms, GB/s and 'fused' ratios."""
    for fn in impls.values():
        fn()  # warm-up (and compilation)
    times = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            times[name].append(_time(fn, device))
    parts = [f"{name} {1e3 * statistics.median(t):.2f} ms "
             f"({traffic / statistics.median(t) / 1e9:.1f} GB/s)" for name, t in times.items()]
    ratios = [f"{statistics.median(a / b for a, b in zip(t, times['fused'])):.2f}x vs {name}"
              for name, t in times.items() if name != "fused"]
    return ", ".join(parts) + "; fused is " + ", ".join(ratios)


def run(device="cpu", repeats=10):
    multiclass_calibration_error = require("torchmetrics.functional.classification", "bench",
                                           "calibkernels' benchmark").multiclass_calibration_error
    device = torch.device(device)
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compiled = torch.compile(reference.focal_loss, dynamic=False)
    print(f"device {device}, {dtype}, {repeats} alternating rounds; ratios are medians of the "
          f"per-round ratios")
    for n, c in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        x = (torch.randn(n, c, device=device, generator=g) * 2).to(dtype).requires_grad_()
        t = torch.randint(0, c, (n,), device=device, generator=g)
        focal = {"fused": lambda: torch.autograd.grad(focal_loss(x, t, gamma=3.0), x),
                 "eager": lambda: torch.autograd.grad(reference.focal_loss(x, t, gamma=3.0), x),
                 "compile": lambda: torch.autograd.grad(compiled(x, t, gamma=3.0), x)}
        traffic = 2 * x.numel() * x.element_size() + 8 * n
        print(f"focal loss fwd+bwd {n}x{c}: " + compare(focal, repeats, device, traffic))
        xd = x.detach()
        cal = {"fused": lambda: ece(xd, t),
               "eager": lambda: reference.calibration_error(xd, t),
               "torchmetrics": lambda: multiclass_calibration_error(xd, t, c, n_bins=15)}
        traffic = x.numel() * x.element_size() + 8 * n
        print(f"ECE {n}x{c}: " + compare(cal, max(3, repeats // 3), device, traffic))
