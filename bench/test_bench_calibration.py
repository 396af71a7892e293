"""Top-label ECE (15 bins) from float32 logits on the CPU: the fused kernel against the eager
reference (a mask per bin) and torchmetrics' multiclass_calibration_error, at the CONTRACT §5
CPU shapes and (65536, 1000).

    .venv/bin/python -m pytest bench/test_bench_calibration.py
"""

import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

import calibkernels as ck
from calibkernels import reference

SHAPES = [(8192, 1000), (65536, 100), (1024, 32000), (65536, 1000)]

IMPLS = {
    "fused": lambda x, t: ck.ece(x, t),
    "eager": lambda x, t: reference.calibration_error(x, t),
    "torchmetrics": lambda x, t: multiclass_calibration_error(x, t, x.shape[1], n_bins=15,
                                                              norm="l1"),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_ece(benchmark, shape, impl):
    n, c = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g) * 2
    t = torch.randint(0, c, (n,), generator=g)
    benchmark.group = f"ece {n}x{c} float32"
    benchmark.extra_info.update(impl=impl, bytes=n * c * x.element_size() + 8 * n)
    fn = IMPLS[impl]
    fn(x, t)
    benchmark(fn, x, t)
