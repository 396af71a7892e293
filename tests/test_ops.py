"""The registered ops: opcheck, torch.compile, dispatch, and clear errors for bad input."""

import os

import pytest
import torch

import calibkernels as ck
from helpers import make_logits

OPS = ["calibkernels::focal_loss", "calibkernels::calibration_bins"]


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

    if ck.ops.triton is None:
        expected = "cuda"
    assert resolve_backend("auto", torch.device("cuda"), what, row_bytes) == expected
    assert resolve_backend("auto", torch.device("cpu"), what, row_bytes) == "cpu"
    assert resolve_backend("auto", torch.device("meta"), what, row_bytes) == "torch"


def test_triton_op_is_registered():
    assert ck.ops.focal_loss_triton is not None
    assert torch.ops.calibkernels.focal_loss_triton.default is not None


def _focal_loss_samples():
    for dtype in [torch.float32, torch.float64, torch.bfloat16, torch.float16]:
        for reduction in ["none", "mean", "sum"]:
            for compute_grad in [True, False]:
                x, t = make_logits(9, 7, dtype, seed=1, ignore_index=-100,
                                   requires_grad=compute_grad)
                w = torch.rand(7, dtype=dtype) + 0.5
                yield (x, t, None, [], [], 2.0, -100, 0.0, reduction, compute_grad)
                yield (x, t, w, [0.2, 0.5], [5.0, 3.0], 2.0, -100, 0.1, reduction, compute_grad)


@pytest.mark.parametrize("args", list(_focal_loss_samples()),
                         ids=lambda a: f"{a[0].dtype}-{a[8]}-grad={a[9]}-w={a[2] is not None}")
def test_opcheck_focal_loss(args):
    torch.library.opcheck(torch.ops.calibkernels.focal_loss.default, args)


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
    with pytest.raises(ValueError, match="logits must be float"):
        ck.focal_loss(torch.ones(4, 5, dtype=torch.int64), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32])
def test_non_int64_targets(dtype):
    x, t = _inputs()
    with pytest.raises(ValueError, match="target must hold int64 class indices"):
        ck.focal_loss(x, t.to(dtype))


@pytest.mark.parametrize("t_shape", [(3,), (4, 1), ()])
def test_mismatched_shapes(t_shape):
    x, _ = _inputs()
    with pytest.raises(ValueError, match="target must have shape"):
        ck.focal_loss(x, torch.zeros(t_shape, dtype=torch.long))


def test_unknown_reduction():
    x, t = _inputs()
    with pytest.raises(ValueError, match="reduction must be one of"):
        ck.focal_loss(x, t, reduction="avg")


@pytest.mark.parametrize("gamma,match", [(-1.0, "gamma must be a finite number >= 0"),
                                         (float("nan"), "gamma must be a finite number"),
                                         ("flsd-99", "unknown gamma schedule"),
                                         ([1.0], "gamma must be a float")])
def test_bad_gamma(gamma, match):
    x, t = _inputs()
    with pytest.raises(ValueError, match=match):
        ck.focal_loss(x, t, gamma)
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
    (dict(weight=torch.ones(4)), r"weight must have shape \(5,\)"),
    (dict(weight=torch.ones(5, dtype=torch.long)), "weight must be a floating tensor"),
    (dict(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\]"),
    (dict(backend="fast"), "backend must be one of"),
])
def test_bad_options(kw, match):
    x, t = _inputs()
    with pytest.raises(ValueError, match=match):
        ck.focal_loss(x, t, **kw)


def test_the_op_itself_checks_its_arguments():
    x, t = _inputs()
    op = torch.ops.calibkernels.focal_loss
    with pytest.raises(ValueError, match="reduction must be 'none', 'mean' or 'sum'"):
        op(x, t, None, [], [], 2.0, -100, 0.0, "avg", False)
    with pytest.raises(ValueError, match="strictly increasing"):
        op(x, t, None, [0.5, 0.2], [1.0, 2.0], 2.0, -100, 0.0, "mean", False)
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        op(x, t, None, [], [], -2.0, -100, 0.0, "mean", False)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        op(x[0], t, None, [], [], 2.0, -100, 0.0, "mean", False)
    with pytest.raises(ValueError, match="logits must be float32"):
        op(x.long(), t, None, [], [], 2.0, -100, 0.0, "mean", False)
    with pytest.raises(ValueError, match="target must hold int64"):
        op(x, t.int(), None, [], [], 2.0, -100, 0.0, "mean", False)


def test_backward_without_computed_gradient_is_an_error():
    x, t = _inputs()
    x.requires_grad_()
    loss, _ = torch.ops.calibkernels.focal_loss(x, t, None, [], [], 2.0, -100, 0.0, "mean", False)
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss.backward()
