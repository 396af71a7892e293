"""calibkernels.linear_focal_loss against the eager path (hidden @ weight.T + bias, then the
reference focal loss): loss and the gradients of hidden, weight and bias, every option, float64 to
1e-10, float32 / bfloat16 within twice eager's error; and peak memory at an LLM-like shape."""

import itertools
import os
import subprocess
import sys

import pytest
import torch

import calibkernels as ck
from calibkernels import reference
from calibkernels.linear_focal_loss import default_chunk_size
from helpers import assert_within_twice_eager, rel_err

GAMMAS = [0.0, 3.0, "flsd-53"]
OPTIONS = list(itertools.product(["none", "mean", "sum"], [0.0, 0.1], [True, False]))


def _case(n, h, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h ** 0.5 * 3
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    target = torch.randint(0, v, (n,), generator=g)
    target[::7] = -100
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), target


def _run(fn, hidden, weight, target, bias, reduction, **kw):
    inputs = [t.detach().requires_grad_() for t in (hidden, weight)]
    b = bias.detach().requires_grad_() if bias is not None else None
    loss = fn(*inputs, target, b, reduction=reduction, **kw)
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    grads = torch.autograd.grad(loss, inputs + ([b] if b is not None else []), go)
    return [loss.detach(), *grads]


def eager(hidden, weight, target, bias=None, **kw):
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    return reference.focal_loss(logits, target, **kw)


@pytest.mark.parametrize("gamma", GAMMAS, ids=str)
@pytest.mark.parametrize("reduction,smoothing,with_bias", OPTIONS, ids=str)
def test_matches_the_eager_path_float64(gamma, reduction, smoothing, with_bias):
    hidden, weight, bias, target = _case(45, 16, 70, torch.float64)
    bias = bias if with_bias else None
    kw = dict(gamma=gamma, label_smoothing=smoothing)
    for chunk in [None, 1, 8, 45, 64]:
        ours = _run(ck.linear_focal_loss, hidden, weight, target, bias, reduction,
                    chunk_size=chunk, **kw)
        expected = _run(eager, hidden, weight, target, bias, reduction, **kw)
        for a, b in zip(ours, expected):
            assert rel_err(a, b) <= 1e-10, chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gamma", GAMMAS, ids=str)
def test_low_precision_within_twice_eager(dtype, gamma):
    hidden, weight, bias, target = _case(64, 32, 300, dtype, seed=1)
    kw = dict(gamma=gamma, label_smoothing=0.1)
    ours = _run(ck.linear_focal_loss, hidden, weight, target, bias, "mean", **kw)
    low = _run(eager, hidden, weight, target, bias, "mean", **kw)
    truth = _run(eager, hidden.double(), weight.double(), target, bias.double(), "mean", **kw)
    assert ours[0].dtype == dtype and ours[2].dtype == dtype
    for name, a, b, c in zip(["loss", "hidden", "weight", "bias"], ours, low, truth):
        assert_within_twice_eager(a, b, c, dtype, name)


def test_float16_under_loss_scaling_within_twice_autocast_cross_entropy():
    # GradScaler's grad_output on a mean over 65536 tokens, an LM-head-like weight (std 0.02): the
    # mean's 1 / N must not reach the float16 hidden gradient before the scale does (its values
    # would be float16 subnormals). The oracle is F.cross_entropy under autocast: float16 logits,
    # the loss and its gradient in float32, rounded to float16 once with the scale applied.
    n, h, v = 65536, 16, 50
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(n, h, generator=g, dtype=torch.float64),
               torch.randn(v, h, generator=g, dtype=torch.float64) * 0.02,
               torch.randn(v, generator=g, dtype=torch.float64) * 0.02]
    target = torch.randint(0, v, (n,), generator=g)
    target[::7] = -100

    def autocast_ce(hidden, weight, target, bias, gamma):
        logits = hidden @ weight.T + bias
        return torch.nn.functional.cross_entropy(logits.float(), target)

    def grads(fn, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in tensors]
        loss = fn(*inputs[:2], target, inputs[2], gamma=0.0)
        return torch.autograd.grad(loss, inputs, torch.tensor(16384.0, dtype=loss.dtype))

    ours = grads(ck.linear_focal_loss, torch.float16)
    oracle = grads(autocast_ce, torch.float16)
    truth = grads(eager, torch.float64)
    for name, a, b, c in zip(["hidden", "weight", "bias"], ours, oracle, truth):
        assert a.dtype == torch.float16
        assert_within_twice_eager(a, b, c, torch.float16, name)


def test_backward_with_grad_output_one_applies_nothing_and_twice_fails_clearly():
    hidden, weight, bias, target = _case(20, 8, 30, torch.float64, seed=2)
    h = hidden.clone().requires_grad_()
    loss = ck.linear_focal_loss(h, weight, target)
    loss.backward(retain_graph=True)
    h_ref = hidden.clone().requires_grad_()
    (expected,) = torch.autograd.grad(eager(h_ref, weight, target), [h_ref])
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ck.linear_focal_loss(h, weight, target), h, create_graph=True)
    assert rel_err(h.grad, expected) <= 1e-10


def test_module_and_tied_weights():
    hidden, weight, bias, target = _case(16, 8, 40, torch.float64, seed=3)
    embedding = torch.nn.Embedding(40, 8, dtype=torch.float64)
    head = ck.LinearFocalLoss(gamma="flsd-53", label_smoothing=0.05)
    assert "chunk_size=None" in repr(head)
    loss = head(hidden, embedding.weight, target)
    (grad,) = torch.autograd.grad(loss, embedding.weight)
    expected = eager(hidden, embedding.weight, target, gamma="flsd-53", label_smoothing=0.05)
    (expected_grad,) = torch.autograd.grad(expected, embedding.weight)
    assert rel_err(loss, expected) <= 1e-12 and rel_err(grad, expected_grad) <= 1e-10


def test_default_chunk_size_is_about_the_hidden_states():
    assert default_chunk_size(8192, 4096, 128256) == 256  # 8192 / ceil(128256 / 4096) = 256
    assert default_chunk_size(8192, 256, 32000) == 128
    assert default_chunk_size(10, 4096, 100) == 16


@pytest.mark.parametrize("call,match", [
    (lambda h, w, t: ck.linear_focal_loss(h, w[:, :3], t), "hidden must be"),
    (lambda h, w, t: ck.linear_focal_loss(h, w, t.float()), "target must hold class indices"),
    (lambda h, w, t: ck.linear_focal_loss(h, w, t, torch.zeros(3)), "bias must have shape"),
    (lambda h, w, t: ck.linear_focal_loss(h, w, t, reduction="avg"), "reduction must be one"),
    (lambda h, w, t: ck.linear_focal_loss(h, w, t, chunk_size=0), "chunk_size must be"),
])
def test_bad_input(call, match):
    hidden, weight, _, target = _case(8, 4, 10, torch.float32, seed=4)
    with pytest.raises(ValueError, match=match):
        call(hidden, weight, target)


MEMORY_PROBE = """
import resource, sys, torch
import calibkernels as ck
from calibkernels import reference
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
n, h, v = 8192, 256, 32000
hidden = torch.randn(n, h, generator=g).requires_grad_()
weight = (torch.randn(v, h, generator=g) / 16).requires_grad_()
target = torch.randint(0, v, (n,), generator=g)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "eager":
    loss = reference.focal_loss(hidden @ weight.T, target)
else:
    loss = ck.linear_focal_loss(hidden, weight, target)
loss.backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.slow
def test_peak_memory_is_a_fraction_of_the_eager_paths():
    # N = 8192, H = 256, V = 32000 float32 on the CPU: the eager path holds N x V logits (1 GB)
    # and more; the fused one a chunk of them (peak RSS above the inputs, each in its own process)
    extra = {}
    for path in ["eager", "fused"]:
        done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, path], capture_output=True,
                              text=True, timeout=900,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert done.returncode == 0, done.stderr
        extra[path] = int(done.stdout.split()[-1])  # KiB
    assert extra["fused"] <= extra["eager"] / 4, extra


@pytest.mark.skipif(torch.cuda.is_available() or not ck.ops.triton_available()
                    or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton chunk kernel on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_chunk_kernel_in_the_interpreter(reduction):
    hidden, weight, bias, target = _case(40, 16, 150, torch.float32, seed=7)
    kw = dict(gamma="flsd-53", label_smoothing=0.1)
    ours = _run(ck.linear_focal_loss, hidden, weight, target, bias, reduction,
                backend="triton", chunk_size=16, **kw)
    low = _run(eager, hidden, weight, target, bias, reduction, **kw)
    truth = _run(eager, hidden.double(), weight.double(), target, bias.double(), reduction, **kw)
    for name, a, b, c in zip(["loss", "hidden", "weight", "bias"], ours, low, truth):
        assert_within_twice_eager(a, b, c, torch.float32, f"triton {reduction} {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_matches_the_eager_path(backend, dtype):
    hidden, weight, bias, target = _case(512, 64, 3000, dtype, seed=5)
    hidden, weight, bias, target = hidden.cuda(), weight.cuda(), bias.cuda(), target.cuda()
    kw = dict(gamma="flsd-53", label_smoothing=0.1)
    for reduction in ["mean", "none"]:
        ours = _run(ck.linear_focal_loss, hidden, weight, target, bias, reduction,
                    backend=backend, **kw)
        low = _run(eager, hidden, weight, target, bias, reduction, **kw)
        truth = _run(eager, hidden.double(), weight.double(), target, bias.double(), reduction,
                     **kw)
        for name, a, b, c in zip(["loss", "hidden", "weight", "bias"], ours, low, truth):
            assert_within_twice_eager(a, b, c, dtype, f"{backend} {reduction} {name}")


@pytest.mark.cuda
def test_gpu_backward_adds_no_host_sync():
    hidden, weight, bias, target = _case(256, 32, 1000, torch.float32, seed=6)
    h, w = hidden.cuda().requires_grad_(), weight.cuda().requires_grad_()
    loss = ck.linear_focal_loss(h, w, target.cuda(), bias.cuda())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert h.grad is not None and w.grad is not None
