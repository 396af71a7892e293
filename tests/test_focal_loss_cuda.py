"""Both GPU backends (CUDA C++ and Triton) against the reference, on a GPU (marked `cuda`)."""

import itertools
from functools import partial

import pytest
import torch

import calibkernels as ck
from calibkernels import reference
from helpers import (assert_nan_logits_like_torch, assert_within_twice_eager, loss_and_grad,
                     make_logits, rel_err)

pytestmark = pytest.mark.cuda

BACKENDS = ["cuda", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
CLASSES = [1, 2, 3, 17, 128, 1000, 4097, 32000, 128256, 262144]
OPTIONS = list(itertools.product([False, True], [None, 2], [0.0, 0.1]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted,ignore_index,smoothing", OPTIONS, ids=str)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 3.0, "flsd-53"], ids=str)
def test_gpu_matches_reference(backend, dtype, weighted, ignore_index, smoothing, gamma):
    for i, c in enumerate(CLASSES):
        reduction = ["none", "mean", "sum"][i % 3]
        n = 64 if c <= 4097 else 4
        x, t = make_logits(n, c, dtype, seed=i, ignore_index=ignore_index,
                           equal_row=not (isinstance(gamma, str) and c in (2, 5)))
        x, t = x.detach().cuda(), t.cuda()
        kw = dict(label_smoothing=smoothing)
        if ignore_index is not None:
            kw["ignore_index"] = ignore_index
        if weighted:
            kw["weight"] = (torch.rand(c, device="cuda") + 0.25).to(dtype)
        kw64 = dict(kw, weight=kw["weight"].double()) if weighted else kw
        ours = loss_and_grad(partial(ck.focal_loss, backend=backend), x, t, gamma, reduction, **kw)
        truth = loss_and_grad(reference.focal_loss, x.double(), t, gamma, reduction, **kw64)
        assert ours[0].dtype == dtype and ours[1].dtype == dtype
        if dtype == torch.float64:
            assert rel_err(ours[0], truth[0]) <= 1e-10, c
            if not (c == 1 and gamma == 0.5):
                assert rel_err(ours[1], truth[1]) <= 1e-10, c
            continue
        eager = loss_and_grad(reference.focal_loss, x, t, gamma, reduction, **kw)
        assert_within_twice_eager(ours[0], eager[0], truth[0], dtype, f"loss C={c}")
        if not (c == 1 and gamma == 0.5):
            assert_within_twice_eager(ours[1], eager[1], truth[1], dtype, f"grad C={c}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_more_than_2_pow_31_elements(backend):
    n, c = 8200, 262144  # N * C > 2^31: 64-bit offsets
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.randint(0, c, (n,), device="cuda", generator=g)
    loss, grad = getattr(ck.ops, "focal_loss" if backend == "cuda" else "focal_loss_triton")(
        x, t, None, [], [], 2.0, -100, 0.0, "none", True)
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device="cuda")
    xr = x[rows].double().requires_grad_()
    ref = reference.focal_loss(xr, t[rows], 2.0, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), xr)
    assert rel_err(loss[rows], ref) < 1e-5
    assert rel_err(grad[rows], ref_grad) < 1e-2  # bfloat16 storage


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_deterministic(backend):
    x, t = make_logits(4096, 1000, torch.float32, seed=1)
    x, t = x.detach().cuda().requires_grad_(), t.cuda()
    fused = partial(ck.focal_loss, backend=backend)
    first = loss_and_grad(fused, x, t, "flsd-53", "mean")
    for _ in range(3):
        again = loss_and_grad(fused, x, t, "flsd-53", "mean")
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("op", ["focal_loss", "focal_loss_triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_opcheck(op, dtype):
    x, t = make_logits(33, 70, dtype, seed=2, ignore_index=-100)
    x, t = x.detach().cuda().requires_grad_(), t.cuda()
    w = torch.rand(70, device="cuda", dtype=dtype)
    for reduction in ["none", "mean", "sum"]:
        torch.library.opcheck(getattr(torch.ops.calibkernels, op).default,
                              (x, t, w, [0.2], [5.0], 3.0, -100, 0.1, reduction, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_bad_target_is_nan_not_out_of_bounds(backend):
    x = torch.randn(4, 5, device="cuda")
    t = torch.tensor([0, 1, 7, -3], device="cuda")
    op = getattr(ck.ops, "focal_loss" if backend == "cuda" else "focal_loss_triton")
    loss, grad = op(x, t, None, [], [], 2.0, -100, 0.0, "none", True)
    torch.cuda.synchronize()
    assert torch.isnan(loss[2:]).all() and torch.isnan(grad[2:]).all()
    assert torch.isfinite(loss[:2]).all() and torch.isfinite(grad[:2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_compile_training_step_fullgraph(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 100)).cuda()
    loss_fn = ck.FocalLoss(gamma="flsd-53", backend=backend)
    x, y = torch.randn(256, 16, device="cuda"), torch.randint(0, 100, (256,), device="cuda")

    def step(x, y):
        return loss_fn(model(x), y)

    eager = step(x, y)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    loss = torch.compile(step, fullgraph=True)(x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_backward_scales_by_grad_output(backend):
    n, c = 1024, 4096
    x = torch.randn(n, c, device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    t = torch.randint(0, c, (n,), device="cuda")
    x1, x3 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ck.focal_loss(x1, t, 2.0, backend=backend).backward()
    (ck.focal_loss(x3, t, 2.0, backend=backend) * 3).backward()
    torch.testing.assert_close(x3.grad, 3 * x1.grad)
    ref = x[:8].double().requires_grad_()
    (reference.focal_loss(ref, t[:8], 2.0, reduction="sum") / n).backward()
    assert rel_err(x1.grad[:8], ref.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [2, 33, 4097, 128256])
@pytest.mark.parametrize("gamma,label_smoothing", [(0.0, 0.0), (3.0, 0.0), (3.0, 0.1)], ids=str)
def test_gpu_nan_logit_makes_its_row_nan_like_torch(backend, dtype, c, gamma, label_smoothing):
    assert_nan_logits_like_torch(
        lambda x, t, **kw: ck.focal_loss(x, t, gamma, label_smoothing=label_smoothing,
                                         backend=backend, **kw),
        c, dtype, "cuda")
