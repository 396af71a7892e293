"""The registered ops: opcheck, torch.compile, dispatch, and clear errors for bad input."""

import os

import pytest
import torch

import calibkernels as ck
from helpers import assert_statistics_only_forward, make_logits

OPS = ["calibkernels::focal_loss_forward", "calibkernels::focal_loss_backward",
       "calibkernels::focal_loss_backward_", "calibkernels::calibration_bins",
       "calibkernels::calibration_sweep", "calibkernels::focal_loss_partial_stats",
       "calibkernels::focal_loss_partial_sums", "calibkernels::focal_loss_finish",
       "calibkernels::focal_loss_window_grad", "calibkernels::scale_unless_one_"]


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cpu_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")


@pytest.mark.skipif(torch.version.cuda is None or os.environ.get("CALIBKERNELS_CUDA") == "0",
                    reason="torch is not a CUDA build, or CUDA was switched off")
@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel(op):
    # A CUDA build of torch with nvcc must give CUDA kernels: a silently CPU-only build fails here.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


@pytest.mark.parametrize("what,row_bytes,expected", [
    ("focal_loss", 1000 * 2, "cuda"), ("focal_loss", 1000 * 4, "triton"),
    ("focal_loss", 32000 * 2, "triton"), ("calibration", 32000 * 4, "cuda"),
    ("calibration", 128256 * 2, "triton")])
def test_auto_backend_follows_the_measured_table(what, row_bytes, expected):
    from calibkernels.focal_loss import resolve_backend

    if not ck.ops.triton_available():
        expected = "cuda"
    assert resolve_backend("auto", torch.device("cuda"), what, row_bytes) == expected
    assert resolve_backend("auto", torch.device("cpu"), what, row_bytes) == "cpu"
    assert resolve_backend("auto", torch.device("meta"), what, row_bytes) == "torch"


def test_autograd_and_autocast_are_registered_for_focal_loss():
    for key in ["Autograd", "AutocastCPU", "AutocastCUDA", "CompositeExplicitAutograd"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key("calibkernels::focal_loss", key)


def test_triton_op_is_registered():
    ck.ops.load_triton()
    assert ck.ops.focal_loss_triton is not None
    assert torch.ops.calibkernels.focal_loss_forward_triton.default is not None


def _focal_loss_samples():
    flsd = ck.NAMED_SCHEDULES["flsd-532"].table
    for dtype in [torch.float32, torch.float64, torch.bfloat16, torch.float16]:
        for reduction in ["none", "mean", "sum"]:
            x, t = make_logits(9, 7, dtype, seed=1, ignore_index=-100)
            w = torch.rand(7, dtype=dtype) + 0.5
            p = torch.rand(9, 7, dtype=dtype).softmax(1)
            yield (x, t, None, torch.tensor([2.0], dtype=torch.float64), -100, 0.0, reduction,
                   "native")
            yield (x, t, w, flsd, -100, 0.1, reduction, "native")
            yield (x, p, w, flsd, -100, 0.1, reduction, "native")


@pytest.mark.parametrize("args", list(_focal_loss_samples()),
                         ids=lambda a: f"{a[0].dtype}-{a[6]}-w={a[2] is not None}-"
                                       f"soft={a[1].is_floating_point()}")
def test_opcheck_focal_loss(args):
    # the differentiable op: schema, fake kernel, autograd (through the C++ Function), compile
    torch.library.opcheck(torch.ops.calibkernels.focal_loss.default, args)
    # and its forward phase: with the gradient, without it, with the row statistics alone
    for compute_grad, compute_stats in [(False, False), (True, False), (False, True)]:
        torch.library.opcheck(torch.ops.calibkernels.focal_loss_forward.default,
                              (*args[:7], compute_grad), {"compute_stats": compute_stats})


@pytest.mark.parametrize("args", list(_focal_loss_samples()),
                         ids=lambda a: f"{a[0].dtype}-{a[6]}-w={a[2] is not None}-"
                                       f"soft={a[1].is_floating_point()}")
def test_statistics_only_forward(args):
    x = args[0].detach().clone()
    x[2, 2] = float("inf")  # a poisoned row (not an ignored one): NaN statistics
    assert_statistics_only_forward(torch.ops.calibkernels.focal_loss_forward, x, *args[1:7])


def test_opcheck_focal_loss_backward():
    x, t = make_logits(9, 7, torch.float32, seed=1, ignore_index=-100, requires_grad=False)
    table = torch.tensor([2.0], dtype=torch.float64)
    for reduction in ["none", "mean"]:
        _, grad, stats = torch.ops.calibkernels.focal_loss_forward(x, t, None, table, -100, 0.1,
                                                                   reduction, True)
        go = torch.rand(9) if reduction == "none" else torch.tensor(2.0)
        torch.library.opcheck(torch.ops.calibkernels.focal_loss_backward.default,
                              (go, x, t, None, table, stats, -100, 0.1, reduction))


@pytest.mark.slow
@pytest.mark.parametrize("gamma", [2.0, "flsd-53"], ids=str)
def test_compile_training_step_fullgraph(gamma):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    loss_fn = ck.FocalLoss(gamma=gamma, label_smoothing=0.05)
    x = torch.randn(64, 16)
    y = torch.randint(0, 10, (64,))

    def step(x, y):
        return loss_fn(model(x), y)

    compiled = torch.compile(step, fullgraph=True)  # raises on any graph break
    eager_loss = step(x, y)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    for _ in range(2):  # the second call reuses the compiled graph
        loss = compiled(x, y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        torch.testing.assert_close(loss, eager_loss)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e)


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_backward_matches_eager_bit_for_bit(reduction):
    # the traced graph runs the same kernels as eager, whatever grad_output is
    x, t = make_logits(33, 11, torch.float32, seed=4, ignore_index=-100, requires_grad=False)
    go = torch.rand(33) + 0.5 if reduction == "none" else torch.tensor(3.0)

    def step(x, t):
        return ck.focal_loss(x, t, gamma="flsd-53", reduction=reduction, label_smoothing=0.1)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for scale in [torch.ones_like(go), go]:
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        compiled(xs[0], t).backward(scale)
        step(xs[1], t).backward(scale)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=0, atol=0)


def _calibkernels_calls(graph):
    """The calibkernels ops a traced graph calls, with their arguments by name."""
    calls = []
    for node in graph.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("calibkernels."):
            names = [a.name for a in node.target._schema.arguments]
            calls.append((node.target, {**dict(zip(names, node.args)), **node.kwargs}))
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_forward_writes_statistics_only(reduction):
    # traced, the backward cannot take over the forward's buffer and runs the gradient phase, so
    # the forward writes no gradient: one read in the forward, one read and write in the backward
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm)
        return compiler

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))
    x, t = make_logits(24, 9, torch.float32, seed=5, ignore_index=-100)
    step = torch.compile(lambda x, t: ck.focal_loss(x, t, gamma=2.0, reduction=reduction),
                         backend=backend, fullgraph=True)
    step(x, t).sum().backward()
    ((op, forward),) = _calibkernels_calls(graphs["forward"])
    assert op is torch.ops.calibkernels.focal_loss_forward.default
    assert forward["compute_grad"] is False and forward["compute_stats"] is True
    ((op, _),) = _calibkernels_calls(graphs["backward"])
    assert op is torch.ops.calibkernels.focal_loss_backward.default
    eager = x.detach().clone().requires_grad_()
    ck.focal_loss(eager, t, gamma=2.0, reduction=reduction).sum().backward()
    torch.testing.assert_close(x.grad, eager.grad, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_backward_twice_with_retain_graph_and_inductor():
    # each backward of the compiled graph writes a fresh gradient, scaled by its own grad_output
    torch._dynamo.reset()
    x, t = make_logits(40, 13, torch.float32, seed=6, ignore_index=-100, requires_grad=False)

    def step(x, t):
        return ck.focal_loss(x, t, gamma=2.0)

    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled_loss, eager_loss = torch.compile(step, fullgraph=True)(xc, t), step(xe, t)
    for scale in [2.0, 1.0, 0.25]:
        gc = torch.autograd.grad(compiled_loss * scale, xc, retain_graph=True)[0]
        ge = torch.autograd.grad(eager_loss * scale, xe, retain_graph=True)[0]
        torch.testing.assert_close(gc, ge)


# ---- bad input: each raises a clear error that names the problem ----

def _inputs():
    return torch.randn(4, 5), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("bad,match", [(12, "target 12 at position 2"), (-5, "target -5")])
def test_out_of_range_target_names_the_value(bad, match):
    x, t = _inputs()
    t[2] = bad
    with pytest.raises(IndexError, match=match):
        ck.focal_loss(x, t)


def test_integer_logits():
    with pytest.raises(ValueError, match="input must be float"):
        ck.focal_loss(torch.ones(4, 5, dtype=torch.int64), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.bool])
def test_targets_of_another_integer_type(dtype):
    # F.cross_entropy takes int64 and uint8 class indices, and floating class probabilities
    x, t = _inputs()
    with pytest.raises(ValueError, match=r"target must hold class indices \(int64 or uint8\)"):
        ck.focal_loss(x, t.to(dtype))


@pytest.mark.parametrize("t_shape", [(3,), (4, 1), ()])
def test_mismatched_shapes(t_shape):
    x, _ = _inputs()
    with pytest.raises(ValueError, match="target must have shape"):
        ck.focal_loss(x, torch.zeros(t_shape, dtype=torch.long))
    with pytest.raises(ValueError, match="target .class indices. must have shape"):
        ck.focal_loss(x.reshape(2, 5, 2), torch.zeros(t_shape, dtype=torch.long))


def test_unknown_reduction():
    x, t = _inputs()
    with pytest.raises(ValueError, match="reduction must be one of"):
        ck.focal_loss(x, t, reduction="avg")


@pytest.mark.parametrize("gamma,match", [(-1.0, "gamma must be a finite number >= 0"),
                                         (float("nan"), "gamma must be a finite number"),
                                         (torch.tensor(-2.0), "gamma must be a finite number"),
                                         (torch.ones(2), "must hold one real number"),
                                         ("flsd-99", "unknown gamma schedule"),
                                         ([1.0], "gamma must be a float")])
def test_bad_gamma(gamma, match):
    x, t = _inputs()
    with pytest.raises(ValueError, match=match):
        ck.focal_loss(x, t, gamma=gamma)
    with pytest.raises(ValueError, match=match):
        ck.FocalLoss(gamma=gamma)


@pytest.mark.parametrize("kw,match", [
    (dict(thresholds=(0.5, 0.2), gammas=(5.0, 3.0)), "strictly increasing"),
    (dict(thresholds=(0.2, 0.2), gammas=(5.0, 3.0)), "strictly increasing"),
    (dict(thresholds=(0.0,), gammas=(5.0,)), r"lie in \(0, 1\]"),
    (dict(thresholds=(1.5,), gammas=(5.0,)), r"lie in \(0, 1\]"),
    (dict(thresholds=(0.2,), gammas=()), "one gamma per threshold"),
    (dict(thresholds=tuple(0.1 * i for i in range(1, 10)), gammas=(1.0,) * 9), "at most 8"),
])
def test_bad_schedule(kw, match):
    with pytest.raises(ValueError, match=match):
        ck.GammaSchedule(**kw)


@pytest.mark.parametrize("kw,match", [
    (dict(weight=torch.ones(4)), r"weight must have shape \(5\)"),
    (dict(weight=torch.ones(5, dtype=torch.long)), "weight must be a floating tensor"),
    (dict(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\]"),
    (dict(backend="fast"), "backend must be one of"),
])
def test_bad_options(kw, match):
    x, t = _inputs()
    with pytest.raises(ValueError, match=match):
        ck.focal_loss(x, t, **kw)


def _table(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_the_op_itself_checks_its_arguments():
    x, t = _inputs()
    op = torch.ops.calibkernels.focal_loss_forward
    with pytest.raises(ValueError, match="reduction must be 'none', 'mean' or 'sum'"):
        op(x, t, None, _table(2.0), -100, 0.0, "avg", False)
    with pytest.raises(ValueError, match="strictly increasing"):
        op(x, t, None, _table(0.5, 0.2, 1.0, 2.0, 2.0), -100, 0.0, "mean", False)
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        op(x, t, None, _table(-2.0), -100, 0.0, "mean", False)
    with pytest.raises(ValueError, match="a gamma table holds 2 n . 1 values"):
        op(x, t, None, _table(0.2, 2.0), -100, 0.0, "mean", False)
    with pytest.raises(ValueError, match="gamma must be a 1-D float64 table"):
        op(x, t, None, _table(2.0).float(), -100, 0.0, "mean", False)
    with pytest.raises(ValueError, match="input must be 2-D"):
        op(x[0], t, None, _table(2.0), -100, 0.0, "mean", False)
    with pytest.raises(ValueError, match="input must be float32"):
        op(x.long(), t, None, _table(2.0), -100, 0.0, "mean", False)
    with pytest.raises(ValueError, match="target must hold class indices"):
        op(x, t.int(), None, _table(2.0), -100, 0.0, "mean", False)
    with pytest.raises(ValueError, match="backend must be 'native' or 'triton'"):
        torch.ops.calibkernels.focal_loss(x, t, None, _table(2.0), -100, 0.0, "mean", "fast")


# ---- F.cross_entropy's signature (CONTRACT §1) ----

def test_signature_is_cross_entropys_plus_keyword_only_gamma_and_backend():
    import inspect

    ours = inspect.signature(ck.focal_loss).parameters
    torch_ = inspect.signature(torch.nn.functional.cross_entropy).parameters
    assert list(ours)[:len(torch_)] == list(torch_)
    for name, p in torch_.items():
        assert ours[name].default == p.default and ours[name].kind == p.kind, name
    assert ours["gamma"].kind == ours["backend"].kind == inspect.Parameter.KEYWORD_ONLY
    assert ours["gamma"].default == 3.0
    module = inspect.signature(ck.FocalLoss).parameters
    torch_module = inspect.signature(torch.nn.CrossEntropyLoss).parameters
    assert list(module)[:len(torch_module)] == list(torch_module)
    assert module["gamma"].kind == inspect.Parameter.KEYWORD_ONLY


def test_code_written_for_cross_entropy_runs_unchanged():
    import torch.nn.functional as F

    x, t = make_logits(10, 6, torch.float64, seed=3)
    w = torch.rand(6, dtype=torch.float64) + 0.5
    for args, kw in [((x, t, w), {}), ((x, t), dict(weight=w, ignore_index=2)),
                     ((), dict(input=x, target=t, reduction="sum")),
                     ((x, t, None, None, 2, None, "none", 0.1), {}),
                     ((x, t), dict(size_average=False)), ((x, t), dict(reduce=False))]:
        torch.testing.assert_close(ck.focal_loss(*args, **kw, gamma=0.0),
                                   F.cross_entropy(*args, **kw))
        module_kw = {k: v for k, v in kw.items() if k not in ("input", "target")}
        torch.testing.assert_close(
            ck.FocalLoss(*args[2:], **module_kw, gamma=0.0)(*(args[:2] or (x, t))),
            torch.nn.CrossEntropyLoss(*args[2:], **module_kw)(*(args[:2] or (x, t))))


def test_uint8_targets_and_gamma_as_numpy_scalar_or_tensor():
    import numpy as np

    x, t = make_logits(10, 6, torch.float64, seed=4)
    expected = ck.focal_loss(x, t, gamma=2.0)
    for gamma in [np.float32(2.0), np.float64(2.0), np.int64(2), torch.tensor(2.0),
                  torch.tensor(2.0, dtype=torch.float64), torch.tensor([2.0]), 2]:
        torch.testing.assert_close(ck.focal_loss(x, t, gamma=gamma), expected)
        torch.testing.assert_close(ck.FocalLoss(gamma=gamma)(x, t), expected)
    torch.testing.assert_close(ck.focal_loss(x, t.to(torch.uint8), gamma=2.0), expected)
    torch.testing.assert_close(ck.focal_loss(x, t.to(torch.uint8), gamma=0.0),
                               torch.nn.functional.cross_entropy(x, t.to(torch.uint8)))


@pytest.mark.slow
def test_changing_gamma_under_compile_neither_breaks_nor_recompiles_per_value():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x, t = make_logits(16, 10, torch.float32, seed=5)

    def step(x, t, gamma):
        return ck.focal_loss(x, t, gamma=gamma, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True)  # raises on a graph break

    def check(gamma):
        loss = compiled(x, t, gamma)
        expected = step(x, t, gamma)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(torch.autograd.grad(loss, x)[0],
                                   torch.autograd.grad(expected, x)[0])

    for gamma in [1.0, 2.0, 2.5, 3.0, 0.5, 4.25, 1.5, 3.75]:
        check(gamma)
    # the first value is specialised, the second makes gamma dynamic: two graphs in all
    assert counters["stats"]["unique_graphs"] <= 2
    torch._dynamo.reset()
    counters.clear()
    for g in (5.0, 4.0, 6.0, 4.5):
        check(ck.GammaSchedule((0.2,), (g,), 3.0))
    assert counters["stats"]["unique_graphs"] <= 2


def test_opcheck_the_phases_over_a_window():
    x, t = make_logits(9, 12, torch.float32, seed=6, ignore_index=-100, requires_grad=False)
    table = torch.tensor([0.2, 5.0, 3.0], dtype=torch.float64)
    window = x[:, 4:9].contiguous()
    stats = torch.ops.calibkernels.focal_loss_partial_stats(window, t, 4, -100)
    torch.library.opcheck(torch.ops.calibkernels.focal_loss_partial_stats.default,
                          (window, t, 4, -100))
    row = torch.ops.calibkernels.focal_loss_partial_stats(x, t, 0, -100)
    torch.library.opcheck(torch.ops.calibkernels.focal_loss_partial_sums.default,
                          (window, t, table, row, 4, 12, -100, 0.1))
    sums = torch.ops.calibkernels.focal_loss_partial_sums(x, t, table, row, 0, 12, -100, 0.1)
    for reduction in ["none", "mean"]:
        torch.library.opcheck(torch.ops.calibkernels.focal_loss_finish.default,
                              (row, sums, t, table, 12, -100, 0.1, reduction))
        _, st = torch.ops.calibkernels.focal_loss_finish(row, sums, t, table, 12, -100, 0.1,
                                                         reduction)
        go = torch.rand(9) if reduction == "none" else torch.tensor(0.5)
        torch.library.opcheck(torch.ops.calibkernels.focal_loss_window_grad.default,
                              (go, window, t, st, 4, 12, -100, 0.1, reduction))
    assert stats.shape == (9, 4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_scale_unless_one_keeps_a_float64_scale(device):
    # t *= scale in t's precision (a float64 scale is never rounded to float32 first); exactly 1
    # leaves t as it is
    op = torch.ops.calibkernels.scale_unless_one_
    t = torch.randn(1000, dtype=torch.float64, device=device)
    want = t * 0.1
    op(t, torch.tensor(0.1, dtype=torch.float64))
    assert torch.equal(t, want)
    before = t.clone()
    op(t, torch.tensor(1.0, dtype=torch.float64, device=device))
    assert torch.equal(t, before)
    h = torch.randn(1000, dtype=torch.bfloat16, device=device)
    want = (h.float() * 3.0).to(torch.bfloat16)
    op(h, torch.tensor(3.0, dtype=torch.float64))
    assert torch.equal(h, want)
