"""`python -m calibkernels bench`: a quick look at the speed-ups on this device. The
pytest-benchmark suites in bench/ (and bench/gpu_suite.sh on a GPU) are the detailed tool."""

import statistics
import time

import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from . import reference
from .calibration import ece
from .focal_loss import focal_loss

CPU_SHAPES = [(8192, 1000), (65536, 100), (1024, 32000)]
GPU_SHAPES = [(65536, 10), (65536, 100), (65536, 1000), (8192, 32000), (8192, 128256),
              (4096, 262144)]


def _median_ms(fn, repeats, device):
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def run(device="cpu", repeats=10):
    device = torch.device(device)
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compiled = torch.compile(reference.focal_loss, dynamic=False)
    print(f"device {device}, {dtype}, medians of {repeats} runs")
    for n, c in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        x = (torch.randn(n, c, device=device, generator=g) * 2).to(dtype).requires_grad_()
        t = torch.randint(0, c, (n,), device=device, generator=g)
        focal = {"fused": lambda: torch.autograd.grad(focal_loss(x, t, 3.0), x),
                 "eager": lambda: torch.autograd.grad(reference.focal_loss(x, t, 3.0), x),
                 "compile": lambda: torch.autograd.grad(compiled(x, t, 3.0), x)}
        traffic = 2 * x.numel() * x.element_size() + 8 * n
        ms = {k: _median_ms(f, repeats, device) for k, f in focal.items()}
        print(f"focal loss fwd+bwd {n}x{c}: " + ", ".join(
            f"{k} {v:.2f} ms ({traffic / v / 1e6:.1f} GB/s)" for k, v in ms.items())
            + f"; fused {ms['eager'] / ms['fused']:.1f}x eager, "
              f"{ms['compile'] / ms['fused']:.1f}x compile")
        xd = x.detach()
        cal = {"fused": lambda: ece(xd, t),
               "eager": lambda: reference.calibration_error(xd, t),
               "torchmetrics": lambda: multiclass_calibration_error(xd, t, c, n_bins=15)}
        traffic = x.numel() * x.element_size() + 8 * n
        ms = {k: _median_ms(f, max(3, repeats // 3), device) for k, f in cal.items()}
        print(f"ECE {n}x{c}: " + ", ".join(
            f"{k} {v:.2f} ms ({traffic / v / 1e6:.1f} GB/s)" for k, v in ms.items())
            + f"; fused {ms['eager'] / ms['fused']:.1f}x eager, "
              f"{ms['torchmetrics'] / ms['fused']:.1f}x torchmetrics")
