"""Every autograd path of calibkernels.focal_loss (CONTRACT §1, Backward) against the eager
reference's autograd: grad_output != 1, retain_graph, accumulation, checkpointing, create_graph
(double backward, Hessian-vector products), forward-mode AD, torch.func, gradients to weights and
probability targets."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import calibkernels as ck
from calibkernels import reference
from helpers import (assert_backward_in_place_keeps_rows_at_one, assert_within_twice_eager,
                     make_logits, make_probs, rel_err)

GAMMAS = [0.0, 2.0, "flsd-53"]


def _case(seed=0, n=9, c=7, prob=False, ignore=True):
    x, t = make_logits(n, c, torch.float64, seed=seed, confident=False, equal_row=False,
                       ignore_index=-100 if ignore and not prob else None)
    return x.detach(), (make_probs(x, seed) if prob else t)


def _ops_called(fn):
    with torch.autograd.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.function_events}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_plain_backward_takes_the_stored_gradient(reduction):
    # loss.backward() (grad_output = 1): the forward's gradient is the answer; the gradient phase
    # (one more read and write of N x C) does not run.
    x, t = _case()
    x.requires_grad_()
    loss = ck.focal_loss(x, t, reduction=reduction)
    called = _ops_called(loss.backward)
    assert "calibkernels::focal_loss_backward" not in called
    assert "calibkernels::focal_loss_backward_" in called  # which exits at once: grad_output 1
    (expected,) = torch.autograd.grad(reference.focal_loss(x, t, reduction=reduction), x)
    assert rel_err(x.grad, expected) <= 1e-12


@pytest.mark.parametrize("dtype,reduction,amp", [
    (torch.float64, "none", False), (torch.float16, "mean", False),
    (torch.float16, "none", False), (torch.float16, "mean", True)], ids=str)
def test_per_sample_and_float16_losses_recompute_the_gradient(dtype, reduction, amp):
    # per-sample losses are masked or weighted, float16 trains under loss scaling (here scaled by
    # 1024, under autocast too): grad_output is almost never 1, so the forward writes the row
    # statistics alone (no gradient to rewrite) and the backward runs the gradient phase once,
    # grad_output applied before the rounding
    x, t = _case(2)
    x = x.to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
        loss = ck.focal_loss(x, t, reduction=reduction, gamma="flsd-53")
    assert loss.dtype == (torch.float32 if amp else dtype)
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape) * 1024
    called = _ops_called(lambda: loss.backward(go))
    assert "calibkernels::focal_loss_backward" in called
    assert "calibkernels::focal_loss_backward_" not in called
    x64, xe = x.detach().double().requires_grad_(), x.detach().clone().requires_grad_()
    (truth,) = torch.autograd.grad(reference.focal_loss(x64, t, reduction=reduction,
                                                        gamma="flsd-53"), x64, go.double())
    with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
        eager_loss = reference.focal_loss(xe, t, reduction=reduction, gamma="flsd-53")
    (eager,) = torch.autograd.grad(eager_loss, xe, go.to(eager_loss.dtype))
    if dtype == torch.float64:
        assert rel_err(x.grad, truth) <= 1e-12
    else:
        assert_within_twice_eager(x.grad, eager, truth, dtype, "float16 gradient")


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("gamma", GAMMAS, ids=str)
def test_retain_graph_backwards_with_other_grad_outputs(gamma, prob):
    x, t = _case(1, prob=prob)
    x.requires_grad_()
    loss = ck.focal_loss(x, t, reduction="none", label_smoothing=0.1, gamma=gamma)
    ref = reference.focal_loss(x, t, reduction="none", label_smoothing=0.1, gamma=gamma)
    first = None
    for scale in [1.0, 3.0, 1.0, -0.5]:
        go = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64) * scale
        (g,) = torch.autograd.grad(loss, x, go, retain_graph=True)
        (e,) = torch.autograd.grad(ref, x, go, retain_graph=True)
        assert rel_err(g, e) <= 1e-12, scale
        if first is None:
            first, first_copy = g, g.clone()
    # a later backward never rewrites a gradient handed out before
    assert torch.equal(first, first_copy)


def test_gradient_accumulation_and_backward_twice():
    x, t = _case(2)
    x.requires_grad_()
    ck.focal_loss(x, t, gamma=2.0).backward()
    (0.5 * ck.focal_loss(x, t, gamma=2.0, reduction="sum")).backward()
    expected = torch.autograd.grad(reference.focal_loss(x, t, gamma=2.0) +
                                   0.5 * reference.focal_loss(x, t, gamma=2.0, reduction="sum"), x)
    assert rel_err(x.grad, expected[0]) <= 1e-12
    x.grad = None
    loss = ck.focal_loss(x, t, gamma=2.0)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing(use_reentrant):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 5)).double()
    h = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (12,))

    def loss_of(h):
        return ck.focal_loss(model(h), t, gamma="flsd-53", label_smoothing=0.05)

    params = [h, *model.parameters()]
    plain = torch.autograd.grad(loss_of(h), params)
    checkpoint(loss_of, h, use_reentrant=use_reentrant).backward()  # reentrant: no .grad()
    for p, expected in zip(params, plain):
        torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("gamma", GAMMAS, ids=str)
def test_double_backward_matches_reference(gamma, prob):
    # create_graph=True: a gradient penalty and a Hessian-vector product are the reference's.
    x, t = _case(3, prob=prob)
    w = torch.rand(7, dtype=torch.float64) + 0.5
    v = torch.randn_like(x)
    results = []
    for fn in [ck.focal_loss, reference.focal_loss]:
        xr = x.clone().requires_grad_()
        loss = fn(xr, t, w, label_smoothing=0.1, gamma=gamma)
        (g,) = torch.autograd.grad(loss, xr, create_graph=True)
        assert g.requires_grad
        (penalty,) = torch.autograd.grad((g ** 2).sum(), xr, retain_graph=True)
        (hvp,) = torch.autograd.grad((g * v).sum(), xr)
        results.append((g.detach(), penalty, hvp))
    for a, b in zip(*results):
        assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("gamma", GAMMAS, ids=str)
def test_gradgradcheck(gamma, reduction):
    x, t = _case(4, n=5, c=4)
    assert torch.autograd.gradgradcheck(
        lambda x: ck.focal_loss(x, t, reduction=reduction, gamma=gamma),
        (x.requires_grad_(),))


@pytest.mark.parametrize("prob", [False, True])
def test_forward_mode_ad(prob):
    x, t = _case(5, prob=prob)
    v = torch.randn_like(x)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, v)
        tangent = fwAD.unpack_dual(ck.focal_loss(dual, t, reduction="none", gamma=2.0)).tangent
    _, expected = torch.func.jvp(
        lambda x: reference.focal_loss(x, t, reduction="none", gamma=2.0), (x,), (v,))
    assert rel_err(tangent, expected) <= 1e-12


@pytest.mark.parametrize("prob", [False, True])
def test_torch_func_transforms(prob):
    # (no ignored sample: the reference's mean over none is 0 / 0, F.cross_entropy's gradient 0)
    x, t = _case(6, prob=prob, ignore=False)

    def ours(x, t):
        return ck.focal_loss(x, t, gamma="flsd-53", label_smoothing=0.1)

    def ref(x, t):
        return reference.focal_loss(x, t, gamma="flsd-53", label_smoothing=0.1)

    assert rel_err(torch.func.grad(ours)(x, t), torch.func.grad(ref)(x, t)) <= 1e-12
    # per-sample gradients, as Opacus-style code takes them
    per_sample = torch.func.vmap(torch.func.grad(lambda xi, ti: ours(xi[None], ti[None])))
    per_sample_ref = torch.func.vmap(torch.func.grad(lambda xi, ti: ref(xi[None], ti[None])))
    assert rel_err(per_sample(x, t), per_sample_ref(x, t)) <= 1e-12
    v = torch.randn_like(x)
    assert rel_err(torch.func.jvp(lambda x: ours(x, t), (x,), (v,))[1],
                   torch.func.jvp(lambda x: ref(x, t), (x,), (v,))[1]) <= 1e-12
    assert rel_err(torch.func.jacrev(lambda x: ours(x, t))(x),
                   torch.func.jacrev(lambda x: ref(x, t))(x)) <= 1e-12


@pytest.mark.parametrize("gamma", GAMMAS, ids=str)
def test_gradients_reach_class_weights_and_probability_targets(gamma):
    # F.cross_entropy differentiates soft targets and their class weights; focal_loss does too,
    # and also the weights of class-index targets (where nll_loss raises instead).
    x, t = _case(7)
    p = make_probs(x, 7)
    for target in [t, p]:
        w = (torch.rand(7, dtype=torch.float64) + 0.5).requires_grad_()
        tgt = target.clone().requires_grad_() if target.is_floating_point() else target
        xr = x.clone().requires_grad_()
        inputs = [xr, w] + ([tgt] if tgt.is_floating_point() else [])
        kw = dict(label_smoothing=0.1, gamma=gamma)
        ours = torch.autograd.grad(ck.focal_loss(xr, tgt, w, **kw), inputs)
        expected = torch.autograd.grad(reference.focal_loss(xr, tgt, w, **kw), inputs)
        for a, b in zip(ours, expected):
            assert rel_err(a, b) <= 1e-12
        if gamma == 0.0 and target.is_floating_point():
            torch_ = torch.autograd.grad(F.cross_entropy(xr, tgt, w, label_smoothing=0.1), inputs)
            for a, b in zip(ours, torch_):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_create_graph_runs_the_inputs_hooks_once():
    # the double-backward path differentiates through an alias: a hook on the logits (or
    # retain_grad) runs once, as with F.cross_entropy
    x, t = _case(8)
    w0 = torch.randn(7, 7, dtype=torch.float64)
    results = []
    for fn in [ck.focal_loss, lambda x, t, **kw: F.cross_entropy(x, t)]:
        w = w0.clone().requires_grad_()
        h = x @ w
        h.register_hook(lambda g: g * 10)
        h.retain_grad()
        fn(h, t, gamma=0.0).backward(create_graph=True)
        results.append((w.grad.detach(), h.grad.detach()))
    for ours, torch_ in zip(*results):
        torch.testing.assert_close(ours, torch_, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("gamma", [0.5, 1.5], ids=str)
def test_composite_path_is_finite_where_p_is_one(gamma):
    # p_y = 1 in float64 (a margin of ~40): q^gamma's derivative is infinite at 0 for gamma < 1
    x = torch.tensor([[40.0, 0.0, -5.0], [1.0, 2.0, 0.5]], dtype=torch.float64,
                     requires_grad=True)
    t = torch.tensor([0, 1])
    (g,) = torch.autograd.grad(ck.focal_loss(x, t, gamma=gamma), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert torch.isfinite(g).all() and torch.isfinite(h).all()
    (plain,) = torch.autograd.grad(ck.focal_loss(x, t, gamma=gamma), x)
    torch.testing.assert_close(g.detach(), plain, rtol=1e-10, atol=1e-14)
    assert torch.isfinite(torch.func.grad(lambda x: ck.focal_loss(x, t, gamma=gamma))(x)).all()


def test_unbatched_input_backward_again_after_its_gradient_is_modified():
    x = torch.randn(7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(3)
    loss = ck.focal_loss(x, t, gamma=2.0)
    for _ in range(3):
        loss.backward(retain_graph=True)
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    g.mul_(2)  # the user's tensor: the graph keeps no reference that this could invalidate
    loss.backward()
    (expected,) = torch.autograd.grad(reference.focal_loss(x, t, gamma=2.0), x)
    torch.testing.assert_close(x.grad, 4 * expected)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_backward_in_place_keeps_rows_at_one(smoothing):
    # the in-place phase's per-row grad_output (the op's contract; focal_loss itself recomputes
    # per-sample losses)
    x, t = _case(10)
    ops = torch.ops.calibkernels
    assert_backward_in_place_keeps_rows_at_one(
        ops.focal_loss_forward, ops.focal_loss_backward, ops.focal_loss_backward_, x.float(), t,
        torch.rand(7) + 0.5, ck.NAMED_SCHEDULES["flsd-53"].table, -100, smoothing)


def test_backward_op_called_directly_checks_targets():
    x, t = _case(9)
    table = torch.tensor([2.0], dtype=torch.float64)
    _, grad, stats = torch.ops.calibkernels.focal_loss_forward(x, t, None, table, -100, 0.0,
                                                               "mean", True)
    bad = t.clone()
    bad[0] = 7
    with pytest.raises(IndexError, match="target 7 at position 0"):
        torch.ops.calibkernels.focal_loss_backward(torch.tensor(2.0, dtype=torch.float64), x,
                                                   bad, None, table, stats, -100, 0.0, "mean")
