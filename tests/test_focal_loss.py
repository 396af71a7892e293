"""calibkernels.focal_loss (fused CPU kernel) against the eager reference, torch and the paper."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import calibkernels as ck
from calibkernels import reference
from helpers import (LOW_PRECISION, assert_nan_logits_like_torch, assert_within_twice_eager,
                     loss_and_grad, make_logits, make_probs, rel_err)

GAMMAS = [0.0, 0.5, 1.0, 2.0, 3.0, 5.0, "flsd-53", "flsd-532"]
SHAPES = [(16, 1, ()), (16, 2, ()), (24, 3, ()), (40, 17, ()), (32, 128, ()), (8, 1000, ()),
          (4, 5, (3, 2))]
OPTIONS = [dict(weight=w, ignore_index=ii, label_smoothing=ls)
           for w, ii, ls in itertools.product([False, True], [None, 3], [0.0, 0.1])]


def _kwargs(opts, c, dtype, seed=1):
    kw = {"label_smoothing": opts["label_smoothing"]}
    if opts["weight"]:
        g = torch.Generator().manual_seed(seed)
        kw["weight"] = (torch.rand(c, generator=g, dtype=torch.float64) + 0.25).to(dtype)
    if opts["ignore_index"] is not None:
        kw["ignore_index"] = opts["ignore_index"]
    return kw


def _equal_row_ok(c, gamma):
    # An all-equal row has p_y = 1/C, exactly a schedule threshold for C = 2 or 5: a tie.
    return not (isinstance(gamma, str) and c in (2, 5))


def _has_unstable_reference_grad(c, gamma):
    # The eager reference's pow backward is Inf * 0 = NaN where q = 0 and 0 < gamma < 1 (C = 1).
    return c == 1 and isinstance(gamma, float) and 0.0 < gamma < 1.0


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("gamma", GAMMAS, ids=str)
def test_matches_reference_float64(gamma, opts, reduction):
    for seed, (n, c, extra) in enumerate(SHAPES):
        kw = _kwargs(opts, c, torch.float64, seed)
        x, t = make_logits(n, c, torch.float64, extra, seed=seed,
                           ignore_index=opts["ignore_index"], equal_row=_equal_row_ok(c, gamma))
        loss, grad = loss_and_grad(ck.focal_loss, x, t, gamma, reduction, **kw)
        ref_loss, ref_grad = loss_and_grad(reference.focal_loss, x, t, gamma, reduction, **kw)
        assert loss.dtype == torch.float64 and loss.shape == ref_loss.shape
        assert rel_err(loss, ref_loss) <= 1e-10, (n, c, extra)
        if not _has_unstable_reference_grad(c, gamma):
            assert rel_err(grad, ref_grad) <= 1e-10, (n, c, extra)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.0, "flsd-53"], ids=str)
@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[3], OPTIONS[5], OPTIONS[7]],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_low_precision_within_twice_eager(dtype, gamma, opts, reduction):
    for seed, (n, c) in enumerate([(64, 10), (32, 128), (16, 1000), (8, 4097)]):
        x, t = make_logits(n, c, dtype, seed=seed, ignore_index=opts["ignore_index"])
        kw = _kwargs(opts, c, dtype, seed)
        # The truth sees exactly the low-precision inputs, in float64.
        kw64 = dict(kw, weight=kw["weight"].double()) if "weight" in kw else kw
        truth = loss_and_grad(reference.focal_loss, x.double(), t, gamma, reduction, **kw64)
        ours = loss_and_grad(ck.focal_loss, x, t, gamma, reduction, **kw)
        eager = loss_and_grad(reference.focal_loss, x, t, gamma, reduction, **kw)
        assert ours[0].dtype == dtype and ours[1].dtype == dtype
        assert_within_twice_eager(ours[0], eager[0], truth[0], dtype, f"loss {n}x{c}")
        assert_within_twice_eager(ours[1], eager[1], truth[1], dtype, f"grad {n}x{c}")


@pytest.mark.parametrize("gamma", GAMMAS, ids=str)
@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[7]],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck(gamma, opts, reduction):
    g = torch.Generator().manual_seed(3)
    c = 5
    while True:  # keep every p_y away from the schedule's thresholds: the loss jumps there
        x = torch.randn(6, c, generator=g, dtype=torch.float64) * 2
        t = torch.randint(0, c, (6,), generator=g)
        p_y = x.softmax(1).gather(1, t[:, None])
        if ((p_y - 0.2).abs().min() > 0.02) and ((p_y - 0.5).abs().min() > 0.02):
            break
    kw = _kwargs(opts, c, torch.float64)
    if opts["ignore_index"] is not None:
        t[2] = kw["ignore_index"]
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: ck.focal_loss(x, t, gamma=gamma, reduction=reduction, **kw), (x,))


COMBOS = list(itertools.product([None, "w"], [-100, 2], ["none", "mean", "sum"], [0.0, 0.2],
                                [(), (3,), (2, 3)]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("weight,ignore_index,reduction,label_smoothing,extra", COMBOS, ids=str)
def test_gamma_zero_is_cross_entropy(dtype, weight, ignore_index, reduction, label_smoothing,
                                     extra):
    n, c = 12, 7
    x, t = make_logits(n, c, dtype, extra, seed=5, ignore_index=ignore_index)
    w = torch.rand(c, dtype=dtype) + 0.5 if weight else None
    kw = dict(weight=w, ignore_index=ignore_index, reduction=reduction,
              label_smoothing=label_smoothing)
    ours = loss_and_grad(ck.focal_loss, x, t, 0.0, **kw)
    torch_ = loss_and_grad(lambda x, t, gamma, **k: F.cross_entropy(x, t, **k), x, t, 0.0, **kw)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[0], torch_[0], **tol)
    torch.testing.assert_close(ours[1], torch_[1], **tol)
    module = ck.FocalLoss(w, ignore_index=ignore_index, reduction=reduction,
                          label_smoothing=label_smoothing, gamma=0.0)
    expected = torch.nn.CrossEntropyLoss(w, ignore_index=ignore_index, reduction=reduction,
                                         label_smoothing=label_smoothing)(x, t)
    torch.testing.assert_close(module(x, t), expected, **tol)


def test_paper_fl3_is_summed_focal_loss():
    # The paper's FocalLoss.forward, verbatim in spirit: gather log p_t, -(1 - p_t)^3 log p_t, sum.
    x, t = make_logits(64, 10, torch.float64, seed=7)
    logpt = F.log_softmax(x, dim=1).gather(1, t.view(-1, 1)).view(-1)
    paper = (-1 * (1 - logpt.exp()) ** 3 * logpt).sum()
    ours = ck.focal_loss(x, t, gamma=3.0, reduction="sum")
    assert rel_err(ours, paper) <= 1e-12
    (g_paper,) = torch.autograd.grad(paper, x)
    (g_ours,) = torch.autograd.grad(ours, x)
    assert rel_err(g_ours, g_paper) <= 1e-10


@pytest.mark.parametrize("name,gamma_dic,default", [("flsd-53", {0.2: 5.0}, 3.0),
                                                     ("flsd-532", {0.2: 5.0, 0.5: 3.0}, 2.0)])
def test_paper_flsd_per_sample_gamma_without_gradient_through_choice(name, gamma_dic, default):
    x, t = make_logits(64, 10, torch.float64, seed=8, confident=False)
    x = (x.detach() * 0.7).requires_grad_()  # a spread of p_y on both sides of the thresholds
    logpt = F.log_softmax(x, dim=1).gather(1, t.view(-1, 1)).view(-1)
    pt = logpt.exp()
    # The paper's AdaptiveFocalLoss picks gamma per sample from .item() values: no gradient.
    gammas = []
    for i in range(pt.shape[0]):
        p = pt[i].item()
        gammas.append(next((g for tau, g in sorted(gamma_dic.items()) if p < tau), default))
    gamma = torch.tensor(gammas, dtype=torch.float64)
    assert len(set(gammas)) > 1
    paper = (-1 * (1 - pt) ** gamma * logpt).sum()
    ours = ck.focal_loss(x, t, gamma=name, reduction="sum")
    assert rel_err(ours, paper) <= 1e-12
    (g_paper,) = torch.autograd.grad(paper, x)
    (g_ours,) = torch.autograd.grad(ours, x)
    assert rel_err(g_ours, g_paper) <= 1e-10


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.0, 5.0], ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_extreme_logits_stay_finite(gamma, label_smoothing):
    g = torch.Generator().manual_seed(11)
    x = (torch.rand(64, 50, generator=g) * 2e4 - 1e4)
    x[:8] = torch.where(torch.rand(8, 50, generator=g) > 0.5, 1e4, -1e4)
    t = torch.randint(0, 50, (64,), generator=g)
    t[:4] = x[:4].argmax(1)  # p_y == 1 exactly in float32
    x[8:16] = 0.0
    x[8:16, 0] = 12.0  # confident rows: p_y >= 0.9999
    t[8:16] = 0
    x.requires_grad_()
    for reduction in ["none", "mean"]:
        loss = ck.focal_loss(x, t, gamma=gamma, reduction=reduction,
                             label_smoothing=label_smoothing)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # and the float32 kernel agrees with the float64 kernel there
    loss64 = ck.focal_loss(x.double(), t, gamma=gamma, label_smoothing=label_smoothing)
    ours = ck.focal_loss(x, t, gamma=gamma, label_smoothing=label_smoothing)
    assert rel_err(ours, loss64) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_true_class_gradient_keeps_its_precision_when_confident(dtype):
    # p_y -> 1: the true-class gradient is -(1 - p_y) G(p_y), tiny but exact, never rounded away.
    x = torch.zeros(4, 3, dtype=dtype)
    x[:, 0] = torch.tensor([5.0, 10.0, 15.0, 20.0], dtype=dtype)
    t = torch.zeros(4, dtype=torch.long)
    x.requires_grad_()
    (g,) = torch.autograd.grad(ck.focal_loss(x, t, gamma=0.0, reduction="sum"), x)
    x64 = x.detach().double()
    expected = -(1 - x64.softmax(1)[:, 0])  # exact: 2 e^-a / (1 + 2 e^-a)
    expected = -2 * torch.exp(-x64[:, 0]) / (1 + 2 * torch.exp(-x64[:, 0]))
    assert rel_err(g[:, 0], expected) < (1e-6 if dtype == torch.float32 else 1e-14)


def test_one_class_is_zero_loss_and_gradient():
    x = torch.randn(8, 1, requires_grad=True)
    t = torch.zeros(8, dtype=torch.long)
    for gamma in GAMMAS:
        loss = ck.focal_loss(x, t, gamma=gamma, label_smoothing=0.1)
        (grad,) = torch.autograd.grad(loss, x)
        assert loss.item() == 0.0 and (grad == 0).all()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_empty_batch(reduction):
    x = torch.randn(0, 5, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    loss = ck.focal_loss(x, t, gamma=2.0, reduction=reduction)
    expected = F.cross_entropy(x, t, reduction=reduction)
    assert loss.shape == expected.shape
    torch.testing.assert_close(loss, expected, equal_nan=True)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert grad.shape == (0, 5)


def test_all_ignored_mean_is_nan_like_torch():
    x = torch.randn(6, 4, requires_grad=True)
    t = torch.full((6,), -100)
    loss = ck.focal_loss(x, t, gamma=3.0)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(x, t))
    assert ck.focal_loss(x, t, gamma=3.0, reduction="sum").item() == 0.0
    (grad,) = torch.autograd.grad(ck.focal_loss(x, t, gamma=3.0, reduction="sum"), x)
    assert (grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("c", [2, 5, 33, 1000, 4097])
@pytest.mark.parametrize("gamma,label_smoothing", [(0.0, 0.0), (3.0, 0.0), (0.0, 0.1), (3.0, 0.1),
                                                   ("flsd-53", 0.0)], ids=str)
def test_nan_logit_makes_its_row_nan_like_torch(dtype, c, gamma, label_smoothing):
    assert_nan_logits_like_torch(
        lambda x, t, **kw: ck.focal_loss(x, t, gamma=gamma, label_smoothing=label_smoothing,
                                         **kw),
        c, dtype)


def test_non_contiguous_inputs():
    x, t = make_logits(12, 9, torch.float32, seed=2)
    xt = x.detach().t().contiguous().t().requires_grad_()  # column-major (12, 9)
    assert not xt.is_contiguous()
    t_strided = torch.stack([t, t], 1)[:, 0]
    assert not t_strided.is_contiguous()
    ours = loss_and_grad(ck.focal_loss, xt, t_strided, 2.0, "none")
    ref = loss_and_grad(ck.focal_loss, x.detach().contiguous(), t, 2.0, "none")
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=0)


def test_unbatched_input_like_cross_entropy():
    x = torch.randn(7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(3)
    for reduction in ["none", "mean", "sum"]:
        torch.testing.assert_close(ck.focal_loss(x, t, gamma=0.0, reduction=reduction),
                                   F.cross_entropy(x, t, reduction=reduction))


@pytest.mark.parametrize("shape", [(512, 300), (4096, 100)], ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_deterministic_across_thread_counts(shape, label_smoothing):
    # Rows go to threads dynamically (csrc/cpu/cpu_parallel.h); more threads than cores make the
    # threads steal each other's chunks in a different order on every run.
    x, t = make_logits(*shape, torch.float32, seed=4)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in [1, 2, 3, 4, old, 3, 4]:
            torch.set_num_threads(threads)
            results.append(loss_and_grad(ck.focal_loss, x, t, "flsd-53", "mean",
                                         label_smoothing=label_smoothing))
    finally:
        torch.set_num_threads(old)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_no_grad_skips_the_gradient():
    x, t = make_logits(10, 6, torch.float32, seed=9)
    with torch.no_grad():
        loss = ck.focal_loss(x, t, gamma=2.0)
    assert not loss.requires_grad
    table = torch.tensor([2.0], dtype=torch.float64)
    _, grad, stats = torch.ops.calibkernels.focal_loss_forward(
        x.detach(), t, None, table, -100, 0.0, "mean", False)
    assert grad.numel() == 0 and stats.numel() == 0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 12), c=st.integers(1, 40), gamma=st.sampled_from(GAMMAS),
       reduction=st.sampled_from(["none", "mean", "sum"]),
       label_smoothing=st.sampled_from([0.0, 0.05, 1.0]), weighted=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_matches_reference(n, c, gamma, reduction, label_smoothing, weighted, seed):
    x, t = make_logits(n, c, torch.float64, seed=seed, ignore_index=-100,
                       equal_row=_equal_row_ok(c, gamma))
    kw = dict(label_smoothing=label_smoothing)
    if weighted:
        kw["weight"] = torch.rand(c, dtype=torch.float64) + 0.1
    loss, grad = loss_and_grad(ck.focal_loss, x, t, gamma, reduction, **kw)
    ref_loss, ref_grad = loss_and_grad(reference.focal_loss, x, t, gamma, reduction, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12, equal_nan=True)
    if not _has_unstable_reference_grad(c, gamma):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12, equal_nan=True)


def test_module_mirrors_cross_entropy_loss():
    w = torch.rand(5)
    m = ck.FocalLoss(w, None, 2, None, "sum", 0.1, gamma="flsd-53")
    assert m.reduction == "sum" and m.ignore_index == 2 and m.label_smoothing == 0.1
    assert m.gamma == ck.NAMED_SCHEDULES["flsd-53"]
    assert torch.equal(m.state_dict()["weight"], w)
    assert "gamma=" in repr(m)
    legacy = ck.FocalLoss(size_average=False, gamma=1.0)
    assert legacy.reduction == "sum"
    x, t = make_logits(8, 5, torch.float32, seed=1)
    torch.testing.assert_close(
        m(x, t), ck.focal_loss(x, t, w, ignore_index=2, reduction="sum", label_smoothing=0.1,
                               gamma="flsd-53"))
    schedule = ck.GammaSchedule(thresholds=(0.3,), gammas=(4.0,), default=1.0)
    torch.testing.assert_close(ck.FocalLoss(gamma=schedule)(x, t),
                               reference.focal_loss(x, t, gamma=schedule))


def test_torch_backend_is_the_reference():
    x, t = make_logits(8, 5, torch.float32, seed=1)
    torch.testing.assert_close(ck.focal_loss(x, t, gamma=2.0, backend="torch"),
                               reference.focal_loss(x, t, gamma=2.0))


# ---- class-probability targets (mixup, cutmix, distillation), as F.cross_entropy takes them ----

PROB_COMBOS = list(itertools.product([None, "w"], ["none", "mean", "sum"], [0.0, 0.2],
                                     [(), (3,), (2, 3)]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("weight,reduction,label_smoothing,extra", PROB_COMBOS, ids=str)
def test_gamma_zero_with_probability_targets_is_cross_entropy(dtype, weight, reduction,
                                                              label_smoothing, extra):
    x, _ = make_logits(12, 7, dtype, extra, seed=6)
    p = make_probs(x, seed=6)
    w = torch.rand(7, dtype=dtype) + 0.5 if weight else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=label_smoothing)
    ours = loss_and_grad(ck.focal_loss, x, p, 0.0, **kw)
    torch_ = loss_and_grad(lambda x, t, gamma, **k: F.cross_entropy(x, t, **k), x, p, 0.0, **kw)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[0], torch_[0], **tol)
    torch.testing.assert_close(ours[1], torch_[1], **tol)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted,label_smoothing", [(False, 0.0), (True, 0.0), (False, 0.1),
                                                      (True, 0.1)], ids=str)
@pytest.mark.parametrize("gamma", GAMMAS, ids=str)
def test_probability_targets_match_reference_float64(gamma, weighted, label_smoothing, reduction):
    for seed, (n, c, extra) in enumerate(SHAPES):
        x, _ = make_logits(n, c, torch.float64, extra, seed=seed)
        p = make_probs(x, seed=seed, sharp=seed % 2 == 1)
        kw = dict(label_smoothing=label_smoothing)
        if weighted:
            kw["weight"] = torch.rand(c, dtype=torch.float64) + 0.25
        loss, grad = loss_and_grad(ck.focal_loss, x, p, gamma, reduction, **kw)
        ref_loss, ref_grad = loss_and_grad(reference.focal_loss, x, p, gamma, reduction, **kw)
        assert loss.shape == ref_loss.shape
        assert rel_err(loss, ref_loss) <= 1e-10, (n, c, extra)
        if not _has_unstable_reference_grad(c, gamma):
            assert rel_err(grad, ref_grad) <= 1e-10, (n, c, extra)


@pytest.mark.parametrize("gamma", GAMMAS, ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_one_hot_probability_targets_equal_class_indices(gamma, label_smoothing):
    # FLSD's gamma comes from sum_k t_k p_k, which is p_y for a one-hot t: the same loss.
    x, t = make_logits(32, 9, torch.float64, seed=12, equal_row=False)
    onehot = F.one_hot(t, 9).double()
    w = torch.rand(9, dtype=torch.float64) + 0.5
    for reduction in ["none", "sum"]:
        kw = dict(weight=w, label_smoothing=label_smoothing)
        by_index = loss_and_grad(ck.focal_loss, x, t, gamma, reduction, **kw)
        by_probs = loss_and_grad(ck.focal_loss, x, onehot, gamma, reduction, **kw)
        assert rel_err(by_probs[0], by_index[0]) <= 1e-12
        assert rel_err(by_probs[1], by_index[1]) <= 1e-12


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("gamma", [0.0, 2.0, "flsd-53"], ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_probability_targets_low_precision_within_twice_eager(dtype, gamma, label_smoothing):
    for seed, (n, c) in enumerate([(64, 10), (16, 1000), (8, 4097)]):
        x, _ = make_logits(n, c, dtype, seed=seed)
        p = make_probs(x, seed=seed)
        kw = dict(label_smoothing=label_smoothing)
        truth = loss_and_grad(reference.focal_loss, x.double(), p.double(), gamma, "mean", **kw)
        ours = loss_and_grad(ck.focal_loss, x, p, gamma, "mean", **kw)
        eager = loss_and_grad(reference.focal_loss, x, p, gamma, "mean", **kw)
        assert ours[0].dtype == dtype and ours[1].dtype == dtype
        assert_within_twice_eager(ours[0], eager[0], truth[0], dtype, f"loss {n}x{c}")
        assert_within_twice_eager(ours[1], eager[1], truth[1], dtype, f"grad {n}x{c}")


def test_probability_targets_in_another_dtype():
    # float32 targets beside bfloat16 logits are read as float32; float64 ones as the math type.
    x, _ = make_logits(16, 11, torch.bfloat16, seed=3)
    p = make_probs(x.float(), seed=3).float()
    ours = loss_and_grad(ck.focal_loss, x, p, 2.0, "none")
    expected = loss_and_grad(reference.focal_loss, x.double(), p.double(), 2.0, "none")
    assert ours[0].dtype == torch.bfloat16
    assert rel_err(ours[0], expected[0]) < 1e-2 and rel_err(ours[1], expected[1]) < 1e-2
    x32 = x.float()
    ours = loss_and_grad(ck.focal_loss, x32, p.double(), 2.0, "none")
    expected = loss_and_grad(ck.focal_loss, x32, p, 2.0, "none")
    assert rel_err(ours[0], expected[0]) < 1e-6 and rel_err(ours[1], expected[1]) < 1e-6


@pytest.mark.parametrize("gamma", [0.0, 2.0, "flsd-532"], ids=str)
def test_probability_targets_gradcheck(gamma):
    x, _ = make_logits(6, 5, torch.float64, seed=4, confident=False, equal_row=False)
    p = make_probs(x, seed=4)
    while True:  # keep every sum_k t_k p_k away from the schedule's thresholds
        p_sel = (p * x.softmax(1)).sum(1)
        if ((p_sel - 0.2).abs().min() > 0.02) and ((p_sel - 0.5).abs().min() > 0.02):
            break
        x = (x * 1.1).detach()
    w = torch.rand(5, dtype=torch.float64) + 0.5
    for reduction in ["none", "mean"]:
        assert torch.autograd.gradcheck(
            lambda x: ck.focal_loss(x, p, w, reduction=reduction, label_smoothing=0.1,
                                    gamma=gamma), (x.detach().requires_grad_(),))


def test_probability_target_errors():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"class-probability targets must have the input's shape"):
        ck.focal_loss(x, torch.rand(4, 6))
    with pytest.raises(ValueError, match=r"target \(class probabilities\) must have shape"):
        ck.focal_loss(x.reshape(2, 5, 2), torch.rand(2, 5, 3))
    with pytest.raises(ValueError, match="ignore_index is not supported for class-probability"):
        ck.focal_loss(x, torch.rand(4, 5), ignore_index=2)


def test_dtypes_without_a_kernel_are_refused_by_name():
    # float8 is "floating" to torch but no kernel reads it: a ValueError, not a dispatcher error
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    f8 = torch.float8_e4m3fn
    no_kernel = "float32, float16, bfloat16 or float64, got torch.float8_e4m3fn: calibkernels"
    for backend in ["auto", "cpu", "torch"]:
        with pytest.raises(ValueError, match=no_kernel):
            ck.focal_loss(x.to(f8), t, backend=backend)
    with pytest.raises(ValueError, match=no_kernel):
        ck.focal_loss(x, torch.rand(4, 5).to(f8))
    with pytest.raises(ValueError, match=no_kernel):
        ck.ece(x.to(f8), t)
    with pytest.raises(ValueError, match=no_kernel):
        ck.linear_focal_loss(torch.randn(4, 3).to(f8), torch.randn(5, 3), t)
    with pytest.raises(ValueError, match=no_kernel):
        ck.fit_temperature(x.to(f8), t)
    with pytest.raises(ValueError, match=no_kernel):
        ck.calibration_sweep(x.to(f8), t, torch.tensor([1.0, 2.0]))


# ---- non-finite and tiny values, as torch ----

INF = float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_infinite_logits_like_cross_entropy(dtype, label_smoothing):
    # +inf anywhere makes the row NaN (x - max is inf - inf); -inf off the target is a class of
    # probability 0; all -inf is NaN; -inf at the target is an infinite loss.
    x = torch.tensor([[0.0, INF, 1.0, 2.0], [0.0, -INF, 1.0, 2.0], [-INF] * 4,
                      [-INF, 0.0, 1.0, 2.0], [INF, 0.0, 1.0, 2.0], [0.5, 1.0, 2.0, 3.0]],
                     dtype=torch.float64)
    t = torch.tensor([0, 0, 1, 0, 0, 3])
    x = x.to(dtype).requires_grad_()
    ours = ck.focal_loss(x, t, reduction="none", label_smoothing=label_smoothing, gamma=0.0)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    # F.cross_entropy on the same values in float64: our result is that, rounded once
    x64 = x.detach().double().requires_grad_()
    torch_ = F.cross_entropy(x64, t, reduction="none", label_smoothing=label_smoothing)
    (g_torch,) = torch.autograd.grad(torch_.sum(), x64)
    tol = dict(rtol=torch.finfo(dtype).eps, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(ours.double(), torch_, **tol)
    torch.testing.assert_close(g_ours.double(), g_torch, **tol)
    for gamma in [2.0, "flsd-53"]:  # the same pattern of NaN with gamma > 0
        loss = ck.focal_loss(x, t, reduction="none", label_smoothing=label_smoothing, gamma=gamma)
        assert torch.equal(loss.isnan(), torch_.isnan())


@pytest.mark.parametrize("c", [2, 40])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_exp_underflows_to_subnormals_and_zero_like_torch(c, label_smoothing):
    # exp below ln(FLT_MIN) = -87.3: torch's gradient entry is the subnormal 3.78e-44 at -100 and
    # 0 at -110 (the CPU float32 kernels once floored it at FLT_MIN = 1.18e-38).
    x = torch.zeros(4, c)
    x[:, 1] = torch.tensor([-100.0, -110.0, -95.0, -87.0])
    x.requires_grad_()
    t = torch.zeros(4, dtype=torch.long)
    kw = dict(reduction="sum", label_smoothing=label_smoothing)
    (ours,) = torch.autograd.grad(ck.focal_loss(x, t, gamma=0.0, **kw), x)
    (torch_,) = torch.autograd.grad(F.cross_entropy(x, t, **kw), x)
    # within two steps of the smallest subnormal (1.4e-45), where torch's own rounding lands
    torch.testing.assert_close(ours[:, 1], torch_[:, 1], rtol=1e-6, atol=3e-45)
    if label_smoothing == 0.0 and c == 2:
        assert 3.7e-44 < ours[0, 1].item() < 3.9e-44 and ours[1, 1].item() == 0.0
