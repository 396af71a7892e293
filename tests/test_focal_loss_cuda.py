"""Both GPU backends (CUDA C++ and Triton) against the reference, on a GPU (marked `cuda`)."""

import itertools
import re
from functools import partial

import pytest
import torch

import calibkernels as ck
from calibkernels import reference
from helpers import (assert_backward_in_place_keeps_rows_at_one, assert_nan_logits_like_torch,
                     assert_statistics_only_forward, assert_within_twice_eager, loss_and_grad,
                     make_logits, make_probs, rel_err)

pytestmark = pytest.mark.cuda

BACKENDS = ["cuda", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# 50257 (GPT-2): rows 16-byte aligned in no dtype, so a long row of the general kernel.
CLASSES = [1, 2, 3, 17, 128, 1000, 4097, 32000, 50257, 128256, 262144]
OPTIONS = list(itertools.product([False, True], [None, 2], [0.0, 0.1]))


def _table(*values):
    return torch.tensor(values, dtype=torch.float64)


def _forward_op(backend):
    if backend == "triton":
        ck.ops.load_triton()
        return torch.ops.calibkernels.focal_loss_forward_triton
    return torch.ops.calibkernels.focal_loss_forward


def _backward_op(backend):
    if backend == "triton":
        ck.ops.load_triton()
        return torch.ops.calibkernels.focal_loss_backward_triton
    return torch.ops.calibkernels.focal_loss_backward


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
    loss, grad, _ = _forward_op(backend)(x, t, None, _table(2.0), -100, 0.0, "none", True)
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device="cuda")
    xr = x[rows].double().requires_grad_()
    ref = reference.focal_loss(xr, t[rows], gamma=2.0, reduction="none")
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_opcheck(backend, dtype):
    x, t = make_logits(33, 70, dtype, seed=2, ignore_index=-100)
    x, t = x.detach().cuda().requires_grad_(), t.cuda()
    w = torch.rand(70, device="cuda", dtype=dtype)
    flsd = ck.NAMED_SCHEDULES["flsd-53"].table
    kernel = "native" if backend == "cuda" else "triton"
    for reduction in ["none", "mean", "sum"]:
        torch.library.opcheck(torch.ops.calibkernels.focal_loss.default,
                              (x, t, w, flsd, -100, 0.1, reduction, kernel))
        torch.library.opcheck(_forward_op(backend).default,
                              (x.detach(), t, w, flsd, -100, 0.1, reduction, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_bad_target_is_nan_not_out_of_bounds(backend):
    x = torch.randn(4, 5, device="cuda")
    t = torch.tensor([0, 1, 7, -3], device="cuda")
    loss, grad, _ = _forward_op(backend)(x, t, None, _table(2.0), -100, 0.0, "none", True)
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
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_compiled_backward_matches_eager(backend, reduction):
    # the compiled graph's backward is the gradient phase, at grad_output 1 and otherwise
    torch._dynamo.reset()
    g = torch.Generator("cuda").manual_seed(8)
    x = torch.randn(300, 1000, device="cuda", generator=g).to(torch.bfloat16)
    t = torch.randint(0, 1000, (300,), device="cuda", generator=g)

    def step(x, t):
        return ck.focal_loss(x, t, gamma="flsd-53", reduction=reduction, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    go = torch.rand(300, device="cuda", generator=g) + 0.5 if reduction == "none" else \
        torch.tensor(4.0, device="cuda")
    for scale in [torch.ones_like(go), go]:
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        compiled(xc, t).backward(scale)
        step(xe, t).backward(scale)
        torch.testing.assert_close(xc.grad, xe.grad)  # eager's fast path may differ by an ulp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("prob,smoothing,weighted", [(False, 0.0, False), (False, 0.1, True),
                                                     (True, 0.0, True)], ids=str)
def test_gpu_statistics_only_forward(backend, dtype, prob, smoothing, weighted):
    # a traced graph's forward (and every float16 or per-sample one): the row statistics alone, as
    # with the gradient, at every row layout (several rows per warp, a row per block, a cluster's
    # row, streamed rows); and the forward's gradient, which focal_loss now asks for only where
    # the loss is a scalar and not float16, is the gradient phase's at grad_output 1
    flsd = ck.NAMED_SCHEDULES["flsd-53"].table
    for c in [10, 1000, 32000, 128256, 50257]:
        n = 300 if c <= 1000 else 9
        x, t = make_logits(n, c, dtype, seed=c, ignore_index=None if prob else -100)
        x = x.detach().cuda()
        x[2, 5] = float("inf")  # a poisoned row: NaN statistics
        target = make_probs(x, seed=c) if prob else t.cuda()
        if not prob:
            target[4] = c  # out of range: a NaN row, never read out of bounds
        w = torch.rand(c, device="cuda").to(dtype) + 0.25 if weighted else None
        for reduction in ["none", "mean"]:
            args = (x, target, w, flsd, -100, smoothing, reduction)
            assert_statistics_only_forward(_forward_op(backend), *args)
            _, grad, stats = _forward_op(backend)(*args, True)
            one = torch.ones(n if reduction == "none" else (), device="cuda", dtype=dtype)
            fresh = _backward_op(backend)(one, x, target, w, flsd, stats, -100, smoothing,
                                          reduction)
            torch.testing.assert_close(grad, fresh, equal_nan=True)  # to an ulp: other kernels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c,smoothing", [(10, 0.0), (1000, 0.0), (1000, 0.1), (128256, 0.0)])
def test_gpu_backward_in_place_keeps_rows_at_one(backend, c, smoothing):
    # the in-place phase's per-row grad_output: rows at 1 exit, the others are rewritten
    x, t = make_logits(64 if c <= 1000 else 6, c, torch.bfloat16, seed=c, ignore_index=-100)
    fwd = _forward_op(backend)
    names = ("focal_loss_backward_triton", "focal_loss_backward_triton_") \
        if backend == "triton" else ("focal_loss_backward", "focal_loss_backward_")
    bwd, bwd_ = (getattr(torch.ops.calibkernels, name) for name in names)
    assert_backward_in_place_keeps_rows_at_one(
        fwd, bwd, bwd_, x.detach().cuda(), t.cuda(), torch.rand(c, device="cuda") + 0.5,
        ck.NAMED_SCHEDULES["flsd-53"].table, -100, smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_backward_scales_by_grad_output(backend):
    n, c = 1024, 4096
    x = torch.randn(n, c, device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    t = torch.randint(0, c, (n,), device="cuda")
    x1, x3 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ck.focal_loss(x1, t, gamma=2.0, backend=backend).backward()
    (ck.focal_loss(x3, t, gamma=2.0, backend=backend) * 3).backward()
    torch.testing.assert_close(x3.grad, 3 * x1.grad)
    ref = x[:8].double().requires_grad_()
    (reference.focal_loss(ref, t[:8], gamma=2.0, reduction="sum") / n).backward()
    assert rel_err(x1.grad[:8], ref.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [2, 33, 4097, 128256])
@pytest.mark.parametrize("gamma,label_smoothing", [(0.0, 0.0), (3.0, 0.0), (3.0, 0.1)], ids=str)
def test_gpu_nan_logit_makes_its_row_nan_like_torch(backend, dtype, c, gamma, label_smoothing):
    assert_nan_logits_like_torch(
        lambda x, t, **kw: ck.focal_loss(x, t, gamma=gamma, label_smoothing=label_smoothing,
                                         backend=backend, **kw),
        c, dtype, "cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("gamma,smoothing", [(0.0, 0.0), (3.0, 0.1), ("flsd-53", 0.0)], ids=str)
def test_gpu_probability_targets(backend, dtype, gamma, smoothing):
    for i, c in enumerate([3, 128, 4097, 32000]):
        reduction = ["none", "mean", "sum"][i % 3]
        x, _ = make_logits(16, c, dtype, seed=i)
        x = x.detach().cuda()
        p = make_probs(x, seed=i)
        w = (torch.rand(c, device="cuda") + 0.25).to(dtype)
        kw = dict(weight=w, label_smoothing=smoothing)
        kw64 = dict(kw, weight=w.double())
        ours = loss_and_grad(partial(ck.focal_loss, backend=backend), x, p, gamma, reduction,
                             **kw)
        truth = loss_and_grad(reference.focal_loss, x.double(), p.double(), gamma, reduction,
                              **kw64)
        if dtype == torch.float64:
            assert rel_err(ours[0], truth[0]) <= 1e-10 and rel_err(ours[1], truth[1]) <= 1e-10
            continue
        eager = loss_and_grad(reference.focal_loss, x, p, gamma, reduction, **kw)
        assert_within_twice_eager(ours[0], eager[0], truth[0], dtype, f"loss C={c}")
        assert_within_twice_eager(ours[1], eager[1], truth[1], dtype, f"grad C={c}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_backward_phases_and_retain_graph(backend):
    # reduction="none": the gradient phase from the input and the row statistics at every
    # grad_output; later backwards never touch a handed-out gradient.
    x, t = make_logits(64, 1000, torch.float32, seed=6, ignore_index=-100)
    x, t = x.detach().cuda().requires_grad_(), t.cuda()
    loss = ck.focal_loss(x, t, reduction="none", label_smoothing=0.1, gamma="flsd-53",
                         backend=backend)
    ref = reference.focal_loss(x.double(), t, reduction="none", label_smoothing=0.1,
                               gamma="flsd-53")
    handed = []
    for go in [torch.ones(64), torch.linspace(0.5, 2.0, 64), torch.ones(64) * 65536.0]:
        (g,) = torch.autograd.grad(loss, x, go.cuda(), retain_graph=True)
        (e,) = torch.autograd.grad(ref, x, go.double().cuda(), retain_graph=True)
        assert rel_err(g, e) < 1e-5
        handed.append((g, g.clone()))
    for g, copy in handed:
        assert torch.equal(g, copy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_autocast_and_loss_scaling(backend, dtype):
    g = torch.Generator(device="cuda").manual_seed(3)
    x = (torch.randn(4, 21, 64, 64, device="cuda", generator=g) * 3).to(dtype)
    t = torch.randint(0, 21, (4, 64, 64), device="cuda", generator=g)

    def scaled_grad(fn, scale=2.0 ** 16):
        xr = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype):
            loss = fn(xr)
        (grad,) = torch.autograd.grad(loss * scale, xr)
        return loss, grad

    loss, ours = scaled_grad(lambda x: ck.focal_loss(x, t, gamma=3.0, backend=backend))
    assert loss.dtype == torch.float32 and ours.dtype == dtype
    _, truth = scaled_grad(lambda x: reference.focal_loss(x.double(), t, gamma=3.0))
    _, eager = scaled_grad(lambda x: reference.focal_loss(x.float(), t, gamma=3.0))
    assert_within_twice_eager(ours, eager, truth, dtype, "scaled gradient")
    with torch.autocast("cuda", dtype=dtype):
        total = ck.focal_loss(x, t, reduction="sum", gamma=0.0, backend=backend)
        expected = torch.nn.functional.cross_entropy(x, t, reduction="sum")
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_gamma_as_a_device_tensor(backend):
    # a CUDA gamma is read by the kernels on the device: no host synchronisation
    x, t = make_logits(32, 100, torch.float32, seed=7)
    x, t = x.detach().cuda(), t.cuda()
    expected = loss_and_grad(partial(ck.focal_loss, backend=backend), x, t, 2.5, "mean")
    ours = loss_and_grad(partial(ck.focal_loss, backend=backend), x, t,
                         torch.tensor(2.5, device="cuda"), "mean")
    torch.testing.assert_close(ours[0], expected[0])
    torch.testing.assert_close(ours[1], expected[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [3.0, "flsd-53"], ids=str)
@pytest.mark.parametrize("c", [10, 1000, 40000])  # several rows a block, a row a block, a cluster
def test_gpu_cuda_graph_replays_a_training_step(backend, gamma, c):
    # A step captured once and replayed on new logits, targets and loss scales gives the eager
    # step's bits: the tickets reset themselves, the gamma table outlives the capture, and
    # grad_output is read on the device at each replay (1: the forward's gradient as it is).
    n = 64
    x = torch.zeros(n, c, device="cuda", requires_grad=True)
    t = torch.zeros(n, dtype=torch.long, device="cuda")
    scale = torch.ones((), device="cuda")

    def step():
        loss = ck.focal_loss(x, t, gamma=gamma, backend=backend)
        (loss * scale).backward()
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the warm-up: compilation, the table's copy to the device
        for _ in range(3):
            step()
            x.grad = None
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    for seed, s in enumerate([1.0, 1024.0, 0.5, 1.0]):
        logits, target = make_logits(n, c, torch.float32, seed=seed)
        with torch.no_grad():
            x.copy_(logits)
        t.copy_(target)
        scale.fill_(s)
        graph.replay()
        xe = logits.detach().cuda().requires_grad_()
        loss = ck.focal_loss(xe, target.cuda(), gamma=gamma, backend=backend)
        (loss * s).backward()
        assert torch.equal(static_loss, loss.detach()), (seed, s)
        assert torch.equal(x.grad, xe.grad), (seed, s)


def test_gpu_triton_gamma_table_across_streams():
    # a fresh schedule's table is copied to the device on a busy stream, then read from another:
    # the second stream waits for the copy instead of reading memory the copy has not reached
    x, t = make_logits(256, 1000, torch.float32, seed=11)
    x, t = x.detach().cuda(), t.cuda()
    expected = loss_and_grad(reference.focal_loss, x.double(), t, "flsd-53", "mean")
    fn = partial(ck.focal_loss, backend="triton")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the kernels compiled first, with another table of one piece
        loss_and_grad(fn, x, t, ck.GammaSchedule((0.3,), (4.0,), 1.0), "mean")
    torch.cuda.synchronize()
    schedule = ck.GammaSchedule(thresholds=(0.2,), gammas=(5.0,), default=3.0)  # FLSD-53, anew
    with torch.cuda.stream(side):
        torch.cuda._sleep(500_000_000)  # a few hundred ms: the copy queues behind it
        first = loss_and_grad(fn, x, t, schedule, "mean")
    again = loss_and_grad(fn, x, t, schedule, "mean")  # at once, from the default stream
    torch.cuda.synchronize()
    for ours in [first, again]:
        torch.testing.assert_close(ours[0].double(), expected[0], rtol=1e-5, atol=0)
        torch.testing.assert_close(ours[1].double(), expected[1], rtol=1e-4, atol=1e-8)


def _cuda_kernels(prof):
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def test_gpu_cuda_forward_is_two_launches_at_most():
    # the mean's divisor in one small kernel, the rows and the final sum in one (CONTRACT §1);
    # no copy, cast or fill beside them (a CPU gamma table is read on the host)
    x, t = make_logits(4096, 100, torch.bfloat16, seed=8)
    x, t = x.detach().cuda(), t.cuda()
    table = _table(3.0)
    op = _forward_op("cuda")
    op(x, t, None, table, -100, 0.0, "mean", True)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for reduction in ["mean", "none"]:
            op(x, t, None, table, -100, 0.0, reduction, True)
        torch.cuda.synchronize()
    assert len(_cuda_kernels(prof)) <= 3, _cuda_kernels(prof)


def test_gpu_triton_forward_is_three_launches_at_most():
    # the mean's divisor in 64 parts, the rows (each program's partial sum), the final sum: no
    # torch op beside them; "sum" skips the divisor, "none" the final sum
    x, t = make_logits(4096, 100, torch.bfloat16, seed=8)
    x, t = x.detach().cuda(), t.cuda()
    table = _table(3.0)
    op = _forward_op("triton")
    for reduction, launches in [("mean", 3), ("sum", 2), ("none", 1)]:
        op(x, t, None, table, -100, 0.0, reduction, True)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            op(x, t, None, table, -100, 0.0, reduction, True)
            torch.cuda.synchronize()
        assert len(_cuda_kernels(prof)) == launches, (reduction, _cuda_kernels(prof))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,c", [(63, 10), (64, 10), (65, 1000), (2_000_003, 10)])
def test_gpu_mean_divisor_in_parts_like_cross_entropy(backend, n, c):
    # the divisor summed in 64 parts (shares of 0 or 1 row, a short last share, 31251 rows a
    # share): the weighted mean and its gradient as F.cross_entropy's; a bad kept target: NaN
    x, t = make_logits(n, c, torch.float32, seed=23, ignore_index=-100)
    x, t = x.detach().cuda().requires_grad_(), t.cuda()
    w = torch.rand(c, device="cuda", generator=torch.Generator("cuda").manual_seed(4)) + 0.25
    ours = ck.focal_loss(x, t, weight=w, gamma=0.0, backend=backend)
    (g,) = torch.autograd.grad(ours, x)
    truth = torch.nn.functional.cross_entropy(x.double(), t, weight=w.double())
    (g_truth,) = torch.autograd.grad(truth, x)
    torch.testing.assert_close(ours.double(), truth.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(g, g_truth.float(), rtol=1e-4, atol=1e-9)
    t_bad = t.clone()
    t_bad[n - 1] = c
    assert ck.focal_loss(x.detach(), t_bad, weight=w, backend=backend).isnan()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [100, 40000])  # a fast-path / several-rows layout, a long row
def test_gpu_backward_reads_grad_output_as_it_is(backend, c):
    # a bf16 grad_output, expanded (stride 0) or strided, read by the gradient kernel in its
    # dtype and stride: one launch, no cast or copy before it; the gradient as the reference's
    n = 512 if c == 100 else 8
    x, t = make_logits(n, c, torch.bfloat16, seed=23, ignore_index=-100)
    x, t = x.detach().cuda().requires_grad_(), t.cuda()
    x64 = x.detach().double().requires_grad_()
    xe = x.detach().clone().requires_grad_()
    truth = reference.focal_loss(x64, t, reduction="none", gamma="flsd-53")
    eager = reference.focal_loss(xe, t, reduction="none", gamma="flsd-53")
    ramp = torch.linspace(-1.0, 2.0, 2 * n, device="cuda").to(torch.bfloat16)
    for go in [torch.tensor(0.75, dtype=torch.bfloat16, device="cuda").expand(n), ramp[::2]]:
        assert go.stride(0) != 1
        loss = ck.focal_loss(x, t, reduction="none", gamma="flsd-53", backend=backend)
        (e,) = torch.autograd.grad(truth, x64, go.double(), retain_graph=True)
        (ge,) = torch.autograd.grad(eager, xe, go, retain_graph=True)
        for phase in ["first", "retained"]:  # reduction="none": the gradient phase each time
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                (g,) = torch.autograd.grad(loss, x, go, retain_graph=True)
                torch.cuda.synchronize()
            assert len(_cuda_kernels(prof)) == 1, (phase, _cuda_kernels(prof))
            assert_within_twice_eager(g, ge, e, torch.bfloat16,
                                      f"{backend} C={c} go={go.stride()} {phase}")


@pytest.mark.parametrize("n", [0, 1, 7, 100000])
@pytest.mark.parametrize("c", [50, 64, 40000])  # the general kernel, the fast path, a cluster
def test_gpu_reduced_loss_in_the_row_kernel(n, c):
    # per-block partials summed in block order: deterministic; N = 0 gives torch's results
    if n * c > 2**28:
        n //= 100
    x, t = make_logits(max(n, 1), c, torch.float32, seed=9, ignore_index=-100)
    x, t = x[:n].detach().cuda(), t[:n].cuda()
    for reduction in ["mean", "sum"]:
        ours = ck.focal_loss(x, t, reduction=reduction, gamma=0.0, backend="cuda")
        torch_ = torch.nn.functional.cross_entropy(x, t, reduction=reduction)
        torch.testing.assert_close(ours, torch_, equal_nan=True, rtol=1e-5, atol=1e-6)
        again = ck.focal_loss(x, t, reduction=reduction, gamma=0.0, backend="cuda")
        assert torch.equal(ours, again) or (ours.isnan() and again.isnan())


# Row lengths at the edges of the CUDA class-index fast path's layouts (sparse_layout in
# csrc/cuda/focal_loss_sparse_kernels.cu), in 16-byte chunks (8 classes of a 16-bit type, 4 of
# float32): rows a warp (<= 32), a warp a row (<= 128), rows a block (<= 512), a row a block
# (<= 4096), a row a cluster of 2, 4 or 8 CTAs on sm_90 (<= 32768), and beyond, the general kernel.
SPARSE_CHUNKS = [1, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257, 512, 513, 1024,
                 1025, 2048, 2049, 4096, 4097, 8193, 16384, 32768, 32769]
# Rows that share their first and last chunks with their neighbours span up to K chunks for
# C = (K - 1) vec + 1 (odd in every dtype; with N = 37 the tensor's last chunk ends past it): at
# most 4 chunks a thread, a row a block up to 2048, a cluster of 2, 4 or 8 beyond (<= 16384).
SHARED_CHUNKS = [1, 2, 4, 5, 8, 9, 32, 33, 128, 129, 512, 513, 1024, 1025, 2048, 2049, 4096,
                 4097, 8192, 8193, 16384, 16385]


def _check_sparse_rows(dtype, gamma, c, i):
    # loss.sum()'s gradient (the forward's registers for a scalar loss that is not float16, the
    # gradient phase otherwise) and the gradient phase from the row statistics (any other
    # grad_output), with weights, ignored rows, a confident and an all-equal row, several rows a
    # block and a partly empty last one
    n = 37 if c <= 8192 else 8  # 8: confident rows 0 and 4, the all-equal row 2 is live
    reduction = ["none", "mean", "sum"][i % 3]
    x, t = make_logits(n, c, dtype, seed=i, ignore_index=-100)
    x, t = x.detach().cuda(), t.cuda()
    w = (torch.rand(c, device="cuda", generator=torch.Generator("cuda").manual_seed(i))
         + 0.25).to(dtype)
    kw = dict(weight=w, ignore_index=-100, reduction=reduction)
    kw64 = dict(kw, weight=w.double())
    xr = x.clone().requires_grad_()
    loss = ck.focal_loss(xr, t, gamma=gamma, backend="cuda", **kw)
    (stored,) = torch.autograd.grad(loss.sum(), xr)
    x64 = x.double().requires_grad_()
    truth = reference.focal_loss(x64, t, gamma=gamma, **kw64)
    (truth_grad,) = torch.autograd.grad(truth.sum(), x64)
    xe = x.clone().requires_grad_()
    eager = reference.focal_loss(xe, t, gamma=gamma, **kw)
    (eager_grad,) = torch.autograd.grad(eager.sum(), xe)
    assert loss.dtype == dtype and stored.dtype == dtype
    assert_within_twice_eager(loss, eager, truth, dtype, f"loss C={c}")
    assert_within_twice_eager(stored, eager_grad, truth_grad, dtype, f"stored grad C={c}")
    ours = loss_and_grad(partial(ck.focal_loss, backend="cuda"), x, t, gamma, **kw)
    want = loss_and_grad(reference.focal_loss, x.double(), t, gamma, **kw64)
    got = loss_and_grad(reference.focal_loss, x, t, gamma, **kw)
    assert_within_twice_eager(ours[1], got[1], want[1], dtype, f"grad phase C={c}")
    again = ck.focal_loss(x, t, gamma=gamma, backend="cuda", **kw)
    assert torch.equal(loss.detach(), again), f"C={c}: not deterministic"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gamma", [3.0, "flsd-53"], ids=str)
def test_gpu_sparse_layouts_match_reference(dtype, gamma):
    vec = 16 // torch.tensor([], dtype=dtype).element_size()
    for i, chunks in enumerate(SPARSE_CHUNKS):
        _check_sparse_rows(dtype, gamma, chunks * vec, i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gamma", [3.0, "flsd-53"], ids=str)
def test_gpu_sparse_shared_chunk_layouts_match_reference(dtype, gamma):
    vec = 16 // torch.tensor([], dtype=dtype).element_size()
    for i, chunks in enumerate(SHARED_CHUNKS):
        _check_sparse_rows(dtype, gamma, (chunks - 1) * vec + 1, i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c_of_vec", [lambda v: 3 * v, lambda v: 33 * v, lambda v: 1025 * v,
                                      lambda v: 4096 * v, lambda v: 8193 * v,
                                      lambda v: 32768 * v, lambda v: 1, lambda v: 2 * v + 3,
                                      lambda v: 1024 * v + 1, lambda v: 6000 * v + 1],
                         ids=["3", "33", "1025", "4096", "8193", "32768", "1", "2+3", "1024+1",
                              "6000+1"])
def test_gpu_sparse_bad_and_poisoned_rows(dtype, c_of_vec):
    # an out-of-range target and a +inf logit make only their rows NaN; an ignored row is 0; where
    # rows share chunks, the +inf at both ends of row 3 stays out of rows 2 and 4
    c = c_of_vec(16 // torch.tensor([], dtype=dtype).element_size())
    x, t = make_logits(6, c, dtype, seed=c)
    x, t = x.detach().cuda(), t.cuda()
    t[1], t[2], x[3, 0], x[3, -1] = c, -100, float("inf"), float("inf")
    loss, grad, _ = _forward_op("cuda")(x, t, None, _table(2.0), -100, 0.0, "none", True)
    torch.cuda.synchronize()
    nan_rows = [False, True, False, True, False, False]
    assert loss.isnan().tolist() == nan_rows
    assert grad.isnan().all(dim=1).tolist() == nan_rows
    assert loss[2].item() == 0.0 and not grad[2].any()
    assert torch.isfinite(grad[[0, 4, 5]]).all()
    assert torch.isfinite(loss[[0, 4, 5]]).all()


def test_gpu_fast_path_kernels_are_the_ones_run():
    # class-index targets without smoothing take the fast path (a cluster of CTAs a row on
    # sm_90), rows that share chunks included; smoothing, or a base that is not 16-byte aligned
    # (a view one element in), takes the general kernel
    cases = [(torch.bfloat16, 1000, 0.0, 0, "sparse"), (torch.float32, 32000, 0.0, 0, "sparse"),
             (torch.bfloat16, 128256, 0.0, 0, "sparse"), (torch.float32, 1000, 0.1, 0, "general"),
             (torch.bfloat16, 1001, 0.0, 0, "sparse"), (torch.bfloat16, 50257, 0.0, 0, "sparse"),
             (torch.float32, 10, 0.0, 0, "sparse"), (torch.float32, 1000, 0.0, 1, "general")]
    for dtype, c, smoothing, offset, expected in cases:
        x, t = make_logits(4, c, dtype, seed=c)
        base = torch.empty(4 * c + offset, dtype=dtype, device="cuda")
        x = base[offset:].view(4, c).copy_(x.detach())
        t = t.cuda()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            _forward_op("cuda")(x, t, None, _table(3.0), -100, smoothing, "mean", True)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA and "forward" in e.name]
        assert len(names) == 1, names
        sparse = "focal_loss_sparse_forward_kernel" in names[0]
        assert sparse == (expected == "sparse"), (dtype, c, offset, names)
        if sparse:  # a row longer than a CTA's chunks runs on a cluster of CTAs (sm_90)
            # template arguments: <T, threads a row, chunks a thread, CTAs a row, aligned>
            tpr, items, cluster = map(int, re.search(r"<[^<>]*?, (\d+), (\d+), (\d+), "
                                                     r"(?:true|false)>", names[0]).groups())
            vec = 16 // x.element_size()
            spans = c // vec if c % vec == 0 else (c + 2 * vec - 2) // vec  # chunks, at most
            assert (cluster > 1) == (spans > tpr * items), names

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_runs_on_the_tensors_device_not_the_current_one(backend):
    # Triton launches on the current device: the ops make the tensors' device current
    x, t = make_logits(64, 1000, torch.float32, seed=4, ignore_index=-100)
    want = loss_and_grad(partial(ck.focal_loss, backend="cpu"), x, t, 3.0, "mean")
    with torch.cuda.device(0):
        got = loss_and_grad(partial(ck.focal_loss, backend=backend), x.detach().to("cuda:1"),
                            t.to("cuda:1"), 3.0, "mean")
        p = x.detach().to("cuda:1").softmax(1)
        ece = ck.ece(p, t.to("cuda:1"), backend=backend)
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ece.cpu(), ck.ece(x.detach().softmax(1), t), rtol=1e-5, atol=1e-7)
