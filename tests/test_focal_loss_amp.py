"""Mixed precision (CONTRACT §1): under torch.autocast the loss is float32 as F.cross_entropy's,
without a float32 copy of the logits; float16 logits under loss scaling keep F.cross_entropy's
gradient accuracy; GradScaler's first step is not skipped."""

import pytest
import torch
import torch.nn.functional as F

import calibkernels as ck
from calibkernels import reference
from helpers import assert_within_twice_eager

DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prob", [False, True])
def test_autocast_loss_is_float32_like_cross_entropy(dtype, prob):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 21, 32, 32, generator=g).to(dtype)
    t = torch.randint(0, 21, (4, 32, 32), generator=g)
    if prob:
        t = torch.randn(4, 21, 32, 32, generator=g).softmax(1).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        ours = ck.focal_loss(x, t, reduction="sum", gamma=0.0)
        torch_ = F.cross_entropy(x, t, reduction="sum")
        per_sample = ck.focal_loss(x, t, reduction="none", gamma=3.0)
        x64 = x.double()
        assert ck.focal_loss(x64, t.double() if prob else t).dtype == torch.float64
    assert ours.dtype == torch_.dtype == per_sample.dtype == torch.float32
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, torch_, rtol=1e-5, atol=0)
    # outside autocast the loss has the input's dtype, as F.cross_entropy's
    assert ck.focal_loss(x, t).dtype == F.cross_entropy(x, t).dtype == dtype


def test_autocast_sum_over_a_segmentation_batch_does_not_overflow():
    # 4 x 21 x 128 x 128 at reduction="sum": ~2e5, beyond float16's 65504.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 21, 128, 128, generator=g).half()
    t = torch.randint(0, 21, (4, 128, 128), generator=g)
    with torch.autocast("cpu", dtype=torch.float16):
        ours = ck.focal_loss(x, t, reduction="sum", gamma=0.0)
        torch_ = F.cross_entropy(x, t, reduction="sum")
    assert ours.dtype == torch.float32 and torch_.item() > 65504
    torch.testing.assert_close(ours, torch_, rtol=1e-5, atol=0)


@pytest.mark.parametrize("gamma", [0.0, 3.0, "flsd-53"], ids=str)
@pytest.mark.parametrize("scale", [2.0 ** 16, 1024.0])
def test_float16_gradient_under_loss_scaling_keeps_cross_entropys_accuracy(gamma, scale):
    # The gradient is rounded to float16 once, after grad_output (the loss scale) is applied: a
    # gradient rounded before it underflows (mean over 2 x 64 x 64 positions: entries ~1e-6).
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 21, 64, 64, generator=g) * 3).half()
    t = torch.randint(0, 21, (2, 64, 64), generator=g)

    def scaled_grad(fn):
        xr = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = fn(xr)
        (grad,) = torch.autograd.grad(loss * scale, xr)
        return grad

    truth = scaled_grad(lambda x: reference.focal_loss(x.double(), t, gamma=gamma))
    ours = scaled_grad(lambda x: ck.focal_loss(x, t, gamma=gamma))
    # what autocast does to F.cross_entropy: a float32 copy of the logits, float32 math
    eager = scaled_grad(lambda x: reference.focal_loss(x.float(), t, gamma=gamma))
    assert ours.dtype == torch.float16
    assert_within_twice_eager(ours, eager, truth, torch.float16, "scaled gradient")
    assert (ours == 0).sum() <= (eager == 0).sum()
    if gamma == 0.0:
        torch_ = scaled_grad(lambda x: F.cross_entropy(x, t))
        assert_within_twice_eager(ours, torch_, truth, torch.float16, "vs F.cross_entropy")


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "focal_loss"])
def test_grad_scaler_first_step_is_not_skipped(loss_fn):
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    before = model.weight.detach().clone()
    fn = F.cross_entropy if loss_fn == "cross_entropy" else ck.focal_loss
    with torch.autocast("cpu", dtype=torch.float16):
        loss = fn(model(x), y)
    scale = scaler.get_scale()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale, "the step was skipped (inf/NaN gradients)"
    assert not torch.equal(model.weight, before)
