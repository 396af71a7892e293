"""Temperature scaling (CONTRACT §3)."""

import math

import pytest
import torch
import torch.nn.functional as F

import calibkernels as ck
from calibkernels.temperature import _nll_and_slope


def _overconfident(n=4000, c=10, sharpen=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, c, generator=g, dtype=torch.float64)
    target = torch.multinomial(base.softmax(1), 1, generator=g).squeeze(1)
    return base * sharpen, target  # calibrated at T = sharpen


@pytest.mark.parametrize("sharpen", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_nll_temperature_is_the_minimum(sharpen, dtype):
    logits, target = _overconfident(sharpen=sharpen)
    t = ck.fit_temperature(logits.to(dtype), target)
    _, slope = _nll_and_slope(logits.to(dtype), target, math.log(t), -100)
    assert abs(slope) < 1e-6
    assert abs(t - sharpen) / sharpen < 0.1  # near the temperature the data were made with
    # the NLL is no smaller on a fine grid around it
    nll = lambda t: F.cross_entropy(logits / t, target).item()  # noqa: E731
    assert all(nll(t) <= nll(t * f) + 1e-12 for f in [0.99, 0.999, 1.001, 1.01])


def test_ece_grid_is_the_papers():
    logits, target = _overconfident(sharpen=2.0, seed=1)
    t = ck.fit_temperature(logits, target, criterion="ece")
    grid = [i / 10 for i in range(1, 101)]
    eces = [ck.ece(logits / g, target).item() for g in grid]
    assert t == grid[eces.index(min(eces))]


def test_ignore_index_and_errors():
    logits, target = _overconfident(seed=2)
    target[::3] = -100
    keep = target != -100
    assert ck.fit_temperature(logits, target) == pytest.approx(
        ck.fit_temperature(logits[keep], target[keep]), rel=1e-6)
    with pytest.raises(ValueError, match="criterion must be one of"):
        ck.fit_temperature(logits, target, criterion="brier")
    with pytest.raises(ValueError, match="no sample to fit on"):
        ck.fit_temperature(logits, torch.full_like(target, -100))
    with pytest.raises(ValueError, match="target must hold int64"):
        ck.fit_temperature(logits, target.float())
