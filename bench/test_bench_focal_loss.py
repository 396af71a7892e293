"""Focal loss forward + backward on the CPU (CONTRACT §5 shapes, float32, gamma = 3): the fused
kernel against the eager reference, torch.compile of the reference, and a same-size copy.

    .venv/bin/python -m pytest bench/test_bench_focal_loss.py
"""

import pytest
import torch

import calibkernels as ck
from calibkernels import reference

CPU_SHAPES = [(8192, 1000), (65536, 100), (1024, 32000)]
_compiled_reference = torch.compile(reference.focal_loss, dynamic=False)

IMPLS = {
    "fused": ck.focal_loss,
    "eager": reference.focal_loss,
    "compile": _compiled_reference,
}


def _inputs(n, c):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, c, generator=g) * 2).requires_grad_()
    t = torch.randint(0, c, (n,), generator=g)
    return x, t


@pytest.mark.parametrize("impl", list(IMPLS) + ["copy"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_focal_loss_forward_backward(benchmark, shape, impl):
    n, c = shape
    x, t = _inputs(n, c)
    benchmark.group = f"focal_loss fwd+bwd {n}x{c} float32"
    # minimal traffic: read the logits once, write the gradient once, read the targets
    benchmark.extra_info.update(impl=impl, bytes=2 * n * c * x.element_size() + 8 * n)
    if impl == "copy":
        xd = x.detach()
        benchmark(xd.clone)
        return
    fn = IMPLS[impl]

    def step():
        return torch.autograd.grad(fn(x, t, gamma=3.0), x)

    step()  # warm-up (and compilation, for torch.compile)
    benchmark(step)
