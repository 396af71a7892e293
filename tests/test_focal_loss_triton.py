"""The Triton kernel against the reference (CONTRACT §4 tolerances), every option. Without a GPU
it runs on CPU tensors in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

import itertools
import os
from functools import partial

import pytest
import torch

import calibkernels as ck
from calibkernels import reference
from helpers import (assert_backward_in_place_keeps_rows_at_one, assert_nan_logits_like_torch,
                     assert_statistics_only_forward, assert_within_twice_eager, loss_and_grad,
                     make_logits, make_probs)

pytestmark = pytest.mark.skipif(
    not ck.ops.triton_available()
    or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton with a GPU or TRITON_INTERPRET=1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CLASSES = [1, 2, 3, 17, 128, 1000, 4097]
REDUCTIONS = ["none", "mean", "sum"]
OPTIONS = list(itertools.product([False, True], [None, 2], [0.0, 0.1]))


def _case(n, c, dtype, gamma, weighted, ignore_index, smoothing, seed):
    x, t = make_logits(n, c, dtype, seed=seed, ignore_index=ignore_index,
                       equal_row=not (isinstance(gamma, str) and c in (2, 5)))
    kw = dict(label_smoothing=smoothing)
    if ignore_index is not None:
        kw["ignore_index"] = ignore_index
    if weighted:
        kw["weight"] = (torch.rand(c, generator=torch.Generator().manual_seed(seed)) + 0.25)
    return x.detach().to(DEVICE), t.to(DEVICE), kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weighted,ignore_index,smoothing", OPTIONS, ids=str)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 3.0, "flsd-53", "flsd-532"], ids=str)
def test_triton_matches_reference(dtype, weighted, ignore_index, smoothing, gamma):
    for i, c in enumerate(CLASSES):
        reduction = REDUCTIONS[i % 3]
        x, t, kw = _case(6, c, dtype, gamma, weighted, ignore_index, smoothing, seed=i)
        kw_low = dict(kw, weight=kw["weight"].to(dtype).to(DEVICE)) if weighted else kw
        kw64 = dict(kw, weight=kw_low["weight"].double()) if weighted else kw

        ours = loss_and_grad(partial(ck.focal_loss, backend="triton"), x, t, gamma, reduction,
                             **kw_low)
        truth = loss_and_grad(reference.focal_loss, x.double(), t, gamma, reduction, **kw64)
        eager = loss_and_grad(reference.focal_loss, x, t, gamma, reduction, **kw_low)
        assert ours[0].dtype == dtype and ours[1].dtype == dtype
        assert_within_twice_eager(ours[0], eager[0], truth[0], dtype, f"loss C={c}")
        if not (c == 1 and gamma == 0.5):  # the eager reference's gradient is NaN there
            assert_within_twice_eager(ours[1], eager[1], truth[1], dtype, f"grad C={c}")
        else:
            assert (ours[1] == 0).all()


def test_triton_extreme_logits_stay_finite():
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(8, 50, generator=g) * 2e4 - 1e4).to(DEVICE)
    t = torch.randint(0, 50, (8,), generator=g).to(DEVICE)
    t[:2] = x[:2].argmax(1)
    for gamma in [0.0, 0.5, 1.0, 2.0, 3.0, 5.0]:
        loss, grad = loss_and_grad(partial(ck.focal_loss, backend="triton"), x, t, gamma, "mean",
                                   label_smoothing=0.1)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_triton_bad_target_is_nan_not_out_of_bounds():
    # The device path cannot raise without a host sync: the loss and gradient turn NaN instead.
    ck.ops.load_triton()
    x = torch.randn(4, 5, device=DEVICE)
    t = torch.tensor([0, 1, 7, 2], device=DEVICE)
    table = torch.tensor([2.0], dtype=torch.float64)
    op = torch.ops.calibkernels.focal_loss_forward_triton
    loss, grad, _ = op(x, t, None, table, -100, 0.0, "none", True)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    assert torch.isfinite(loss[[0, 1, 3]]).all() and torch.isfinite(grad[[0, 1, 3]]).all()
    mean, _, _ = op(x, t, None, table, -100, 0.0, "mean", False)
    assert torch.isnan(mean)


def test_triton_backend_needs_a_device_it_can_run_on(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        ck.focal_loss(x, t, backend="triton")
    with pytest.raises(ValueError, match="backend=.cuda. needs cuda tensors"):
        ck.focal_loss(x, t, backend="cuda")


@pytest.mark.parametrize("c", [2, 33, 4097, 20000])  # 20000: the row streamed 16384 at a time
@pytest.mark.parametrize("gamma,label_smoothing", [(0.0, 0.0), (3.0, 0.0), (3.0, 0.1)], ids=str)
def test_triton_nan_logit_makes_its_row_nan_like_torch(c, gamma, label_smoothing):
    assert_nan_logits_like_torch(
        lambda x, t, **kw: ck.focal_loss(x, t, gamma=gamma, label_smoothing=label_smoothing,
                                         backend="triton", **kw),
        c, torch.float32, DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weighted,smoothing", [(False, 0.0), (True, 0.1)], ids=str)
@pytest.mark.parametrize("gamma", [0.0, 3.0, "flsd-53"], ids=str)
def test_triton_probability_targets(dtype, weighted, smoothing, gamma):
    for i, c in enumerate([3, 17, 1000]):
        reduction = REDUCTIONS[i % 3]
        x, _ = make_logits(6, c, dtype, seed=i)
        x = x.detach().to(DEVICE)
        p = make_probs(x, seed=i)
        kw = dict(label_smoothing=smoothing)
        if weighted:
            kw["weight"] = (torch.rand(c, generator=torch.Generator().manual_seed(i)) + 0.25)
        kw64 = dict(kw, weight=kw["weight"].double()) if weighted else kw
        kw = dict(kw, weight=kw["weight"].to(DEVICE)) if weighted else kw
        ours = loss_and_grad(partial(ck.focal_loss, backend="triton"), x, p, gamma, reduction, **kw)
        truth = loss_and_grad(reference.focal_loss, x.double(), p.double(), gamma, reduction,
                              **kw64)
        eager = loss_and_grad(reference.focal_loss, x, p, gamma, reduction, **kw)
        assert_within_twice_eager(ours[0], eager[0], truth[0], dtype, f"loss C={c}")
        assert_within_twice_eager(ours[1], eager[1], truth[1], dtype, f"grad C={c}")


def test_triton_backward_phases():
    # reduction="none": the gradient phase at every grad_output, retain_graph
    x, t = make_logits(8, 33, torch.float32, seed=4, ignore_index=-100)
    x = x.detach().to(DEVICE).requires_grad_()
    loss = ck.focal_loss(x, t, reduction="none", label_smoothing=0.1, gamma="flsd-53",
                         backend="triton")
    ref = reference.focal_loss(x.double(), t, reduction="none", label_smoothing=0.1,
                               gamma="flsd-53")
    for go in [torch.ones(8), torch.linspace(0.5, 2.0, 8), torch.ones(8)]:
        (g,) = torch.autograd.grad(loss, x, go.to(DEVICE), retain_graph=True)
        (e,) = torch.autograd.grad(ref, x, go.double().to(DEVICE), retain_graph=True)
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout", ["streamed", "row-tiles"])
@pytest.mark.parametrize("prob,smoothing", [(False, 0.0), (False, 0.1), (True, 0.0)], ids=str)
def test_triton_backward_in_place_keeps_rows_at_one(monkeypatch, layout, prob, smoothing):
    ck.ops.load_triton()
    from calibkernels import triton_ops
    for name, value in _layouts()[layout].items():
        monkeypatch.setattr(triton_ops, name, value)
    x, t = make_logits(13, 37, torch.float32, seed=12, ignore_index=None if prob else -100)
    x = x.detach().to(DEVICE)
    ops = torch.ops.calibkernels
    assert_backward_in_place_keeps_rows_at_one(
        ops.focal_loss_forward_triton, ops.focal_loss_backward_triton,
        ops.focal_loss_backward_triton_, x, make_probs(x, seed=12) if prob else t.to(DEVICE),
        (torch.rand(37) + 0.5).to(DEVICE), ck.NAMED_SCHEDULES["flsd-53"].table, -100, smoothing)


def test_triton_infinite_logits_like_cross_entropy():
    inf = float("inf")
    x = torch.tensor([[0.0, inf, 1.0], [0.0, -inf, 1.0], [-inf, 0.0, 1.0]], device=DEVICE)
    t = torch.tensor([0, 0, 0], device=DEVICE)
    loss = ck.focal_loss(x, t, reduction="none", gamma=0.0, backend="triton")
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x, t, reduction="none"),
                               equal_nan=True)


def test_triton_ignored_row_with_an_infinite_logit_is_zero():
    x = torch.tensor([[float("inf"), 0.0], [1.0, 2.0]], device=DEVICE)
    t = torch.tensor([-100, 1], device=DEVICE)
    for reduction in ["none", "sum", "mean"]:
        torch.testing.assert_close(
            ck.focal_loss(x, t, reduction=reduction, gamma=0.0, backend="triton"),
            torch.nn.functional.cross_entropy(x, t, reduction=reduction))


def _layouts():
    from calibkernels.triton_ops import PER_THREAD
    return {
        # every row streamed in 16-class pieces (the path of long rows), one row per program
        "streamed": dict(PER_THREAD=dict.fromkeys(PER_THREAD, 0),
                         STREAM_BLOCK={2: 16, 4: 16, 8: 16}),
        # rows held whole, four per program: 13 rows leave the last program partly empty
        "row-tiles": dict(MAX_ROWS=4),
    }


@pytest.mark.parametrize("layout", ["streamed", "row-tiles"])
@pytest.mark.parametrize("prob,smoothing,weighted", [(False, 0.0, False), (False, 0.1, True),
                                                     (True, 0.0, True)], ids=str)
@pytest.mark.parametrize("gamma", [3.0, "flsd-53"], ids=str)
def test_triton_layouts_match_reference(monkeypatch, layout, prob, smoothing, weighted, gamma):
    # Both kernel shapes (rows held whole, several per program; rows streamed in pieces) at
    # sizes the interpreter can run, with a grad_output that is 1 on some rows only (per-sample
    # losses: the gradient phase for every row; test_triton_backward_in_place_keeps_rows_at_one
    # has the in-place phase that skips rows at 1).
    ck.ops.load_triton()
    from calibkernels import triton_ops
    for name, value in _layouts()[layout].items():
        monkeypatch.setattr(triton_ops, name, value)
    for i, c in enumerate([5, 37, 100]):
        x, t = make_logits(13, c, torch.float32, seed=10 + i, ignore_index=None if prob else -100,
                           equal_row=not isinstance(gamma, str))  # p_y = 1/5: FLSD's threshold
        x = x.detach().to(DEVICE)
        target = make_probs(x, seed=i) if prob else t.to(DEVICE)
        rows, _, single, _ = triton_ops.focal_layout(13, c, x.dtype, prob or smoothing > 0)
        assert (not single) if layout == "streamed" else (rows == 4 and single)
        kw = dict(label_smoothing=smoothing, gamma=gamma)
        if weighted:
            kw["weight"] = torch.rand(c, generator=torch.Generator().manual_seed(i)) + 0.25
        kw64 = dict(kw, weight=kw["weight"].double()) if weighted else kw
        kw = dict(kw, weight=kw["weight"].to(DEVICE)) if weighted else kw
        for reduction in REDUCTIONS:
            xg = x.clone().requires_grad_()
            x64 = x.double().requires_grad_()
            ours = ck.focal_loss(xg, target, reduction=reduction, backend="triton", **kw)
            truth = reference.focal_loss(x64, target.double() if prob else target,
                                         reduction=reduction, **kw64)
            torch.testing.assert_close(ours.double(), truth, rtol=2e-5, atol=1e-6)
            go = torch.ones_like(ours)
            if reduction == "none":
                go[1::3] = torch.linspace(0.5, 2.0, go[1::3].numel(), device=go.device)
            (g,) = torch.autograd.grad(ours, xg, go)
            (e,) = torch.autograd.grad(truth, x64, go.double())
            torch.testing.assert_close(g.double(), e, rtol=2e-5, atol=1e-7,
                                       msg=lambda m: f"{layout} C={c} {reduction}: {m}")


@pytest.mark.parametrize("layout", ["streamed", "row-tiles"])
@pytest.mark.parametrize("prob,smoothing,weighted", [(False, 0.0, False), (False, 0.1, True),
                                                     (True, 0.0, True)], ids=str)
def test_triton_statistics_only_forward(monkeypatch, layout, prob, smoothing, weighted):
    # the forward of a traced graph: the row statistics alone, the same as with the gradient
    ck.ops.load_triton()
    from calibkernels import triton_ops
    for name, value in _layouts()[layout].items():
        monkeypatch.setattr(triton_ops, name, value)
    x, t = make_logits(13, 37, torch.float32, seed=3, ignore_index=None if prob else -100)
    x = x.detach().to(DEVICE)
    x[2, 5] = float("inf")  # a poisoned row: NaN statistics
    target = make_probs(x, seed=3) if prob else t.to(DEVICE)
    if not prob:
        target[4] = 37  # out of range: a NaN row, never read out of bounds
    w = torch.rand(37, generator=torch.Generator().manual_seed(3)).to(DEVICE) + 0.25 \
        if weighted else None
    table = ck.NAMED_SCHEDULES["flsd-53"].table
    for reduction in REDUCTIONS:
        assert_statistics_only_forward(triton_ops.focal_loss_forward_triton, x, target, w, table,
                                       -100, smoothing, reduction)


@pytest.mark.parametrize("prob", [False, True], ids=["indices", "probabilities"])
def test_triton_empty_batch_like_cross_entropy(prob):
    # no program runs: the mean of nothing is NaN, the sum 0, as F.cross_entropy's
    x = torch.empty(0, 5, device=DEVICE, requires_grad=True)
    t = torch.empty(0, 5, device=DEVICE) if prob else torch.empty(0, dtype=torch.int64,
                                                                  device=DEVICE)
    for reduction in REDUCTIONS:
        ours = ck.focal_loss(x, t, reduction=reduction, gamma=0.0, backend="triton")
        torch_ = torch.nn.functional.cross_entropy(x, t, reduction=reduction)
        torch.testing.assert_close(ours, torch_, equal_nan=True)
        (g,) = torch.autograd.grad(ours.sum(), x)
        assert g.shape == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_reduced_loss_like_cross_entropy(monkeypatch, dtype):
    # one row a program (40 or 130 programs), weighted or not: the per-row losses in float32,
    # summed in float64, rounded to the loss's dtype as torch's .to() does; the divisor in 64
    # parts (one row each, some empty; 3 rows each, the last short); the same bits every call
    ck.ops.load_triton()
    from calibkernels import triton_ops
    monkeypatch.setattr(triton_ops, "MAX_ROWS", 1)
    weight = (torch.rand(7, generator=torch.Generator().manual_seed(3)) + 0.25).to(DEVICE)
    for n in [40, 130]:
        x, t = make_logits(n, 7, dtype, seed=21, ignore_index=-100)
        x, t = x.detach().to(DEVICE), t.to(DEVICE)
        for kw, reduction in itertools.product([{}, dict(weight=weight)], ["mean", "sum"]):
            ours = ck.focal_loss(x, t, reduction=reduction, gamma=0.0, backend="triton", **kw)
            again = ck.focal_loss(x, t, reduction=reduction, gamma=0.0, backend="triton", **kw)
            truth = torch.nn.functional.cross_entropy(x.double(), t, reduction=reduction,
                                                      **{k: v.double() for k, v in kw.items()})
            assert ours.dtype == dtype and torch.equal(ours, again)
            if dtype == torch.bfloat16 and DEVICE == "cpu":
                # Triton's interpreter truncates float32 -> bfloat16 (its cast_impl), where the
                # GPU rounds to nearest: within an ulp, never above the true magnitude
                assert ours.double().abs() <= truth.abs() * (1 + 1e-6), (ours, truth)
                rounding = 2**-7
            else:
                rounding = 2e-6 if dtype == torch.float32 else 2**-8  # half an ulp of bf16
            torch.testing.assert_close(ours.double(), truth, rtol=rounding, atol=0)
    # a kept target out of range makes the mean NaN (the divisor), and its row's sum NaN
    t_bad = t.clone()
    t_bad[35] = 7
    for reduction in ["mean", "sum"]:
        assert ck.focal_loss(x, t_bad, reduction=reduction, backend="triton").isnan()


def test_triton_grad_output_in_its_dtype_and_stride():
    # an expanded (stride 0) bf16 grad_output is read as it is: no copy, the same gradient
    x, t = make_logits(9, 40, torch.bfloat16, seed=22, ignore_index=-100)
    x, t = x.detach().to(DEVICE).requires_grad_(), t.to(DEVICE)
    x64 = x.detach().double().requires_grad_()
    truth = reference.focal_loss(x64, t, reduction="none", gamma="flsd-53")
    for go in [torch.tensor(0.75, dtype=torch.bfloat16, device=DEVICE).expand(9),
               torch.linspace(-1, 2, 18, device=DEVICE).to(torch.bfloat16)[::2]]:
        assert go.stride(0) != 1
        ours = ck.focal_loss(x, t, reduction="none", gamma="flsd-53", backend="triton")
        (e,) = torch.autograd.grad(truth, x64, go.double(), retain_graph=True)
        for _ in range(2):  # reduction="none": the gradient phase, each time a fresh tensor
            (g,) = torch.autograd.grad(ours, x, go, retain_graph=True)
            torch.testing.assert_close(g.double(), e, rtol=2e-2, atol=1e-4)
    with pytest.raises(ValueError, match="grad_output must have 9 values"):
        torch.ops.calibkernels.focal_loss_backward_triton(
            torch.ones(3, device=DEVICE), x.detach(), t, None, torch.zeros(1, dtype=torch.float64),
            torch.zeros(9, 7, device=DEVICE), -100, 0.0, "none")


def test_triton_gamma_table_copied_to_the_device_once():
    # a CPU table is copied to the kernels' device on first use and again only once it changes
    ck.ops.load_triton()
    from calibkernels.triton_ops import _table_on
    table = torch.tensor([2.0], dtype=torch.float64)
    meta = torch.device("meta")
    first = _table_on(table, meta)
    assert first.device == meta and _table_on(table, meta) is first
    table.add_(1.0)  # in place: the table's version moves on
    assert _table_on(table, meta) is not first
    assert _table_on(table, torch.device("cpu")) is table
    with torch.inference_mode():  # no version counter: copied every time, and no error
        frozen = torch.tensor([2.0], dtype=torch.float64)
    assert _table_on(frozen, meta).device == meta
