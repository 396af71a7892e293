"""Temperature scaling (Guo et al. 2017) on the fused ops (CONTRACT §3)."""

import math

import torch

from . import ops
from .calibration import calibration_sweep
from .focal_loss import focal_loss

CRITERIA = ("nll", "ece")


def _nll_and_slope(logits, target, u, ignore_index):
    """Mean NLL of softmax(logits / T) at T = exp(u), and its derivative in u = log T (the NLL is
    the fused focal loss at gamma = 0; the derivative comes by autograd through logits / T)."""
    u = torch.tensor(u, dtype=logits.dtype, device=logits.device, requires_grad=True)
    with torch.enable_grad():
        nll = focal_loss(logits * torch.exp(-u), target, ignore_index=ignore_index, gamma=0.0)
        (slope,) = torch.autograd.grad(nll, u)
    return nll.item(), slope.item()


def fit_temperature(logits, target, criterion="nll", *, ignore_index=-100, tol=1e-6,
                    max_iter=100):
    """The temperature T > 0 that calibrates held-out logits: softmax(logits / T).

    criterion="nll" minimises the mean NLL over log T (a safeguarded secant search on the
    derivative, stopping at |d NLL / d log T| < tol or max_iter evaluations); criterion="ece" is
    the paper's grid T in {0.1, 0.2, ..., 10.0}, keeping the first T of least 15-bin ECE.
    Returns T as a Python float.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"fit_temperature: criterion must be one of {CRITERIA}, got {criterion!r}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError("fit_temperature: logits must be a 2-D (N, C) floating tensor")
    ops.check_float(logits, "fit_temperature: logits")
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64 or \
            tuple(target.shape) != (logits.shape[0],):
        raise ValueError(f"fit_temperature: target must hold int64 class indices of shape "
                         f"({logits.shape[0]},)")
    if not bool((target != ignore_index).any()):
        raise ValueError("fit_temperature: no sample to fit on (all ignored, or none)")
    logits = logits.detach()
    kept = logits[target != ignore_index]
    if not bool(torch.isfinite(kept).all()):
        bad = int((~torch.isfinite(kept)).any(1).sum())
        raise ValueError(f"fit_temperature: the logits of {bad} sample(s) are not finite (NaN or "
                         f"inf): no temperature calibrates them; drop or fix those samples")
    if criterion == "ece":
        # the paper's grid, every T from one read of the logits (calibration_sweep)
        grid = [i / 10 for i in range(1, 101)]
        eces = calibration_sweep(logits, target, grid, ignore_index=ignore_index)["ece"]
        return grid[int(torch.argmin(eces))]  # argmin takes the first of equal minima

    logits = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    evals = 0

    def slope(u):
        nonlocal evals
        evals += 1
        return _nll_and_slope(logits, target, u, ignore_index)[1]

    # Bracket the root of the slope: the NLL is convex in 1 / T, so the slope changes sign once.
    u0, g0 = 0.0, slope(0.0)
    if abs(g0) < tol:
        return 1.0
    step = -1.0 if g0 > 0 else 1.0
    lo_u, lo_g = u0, g0
    while evals < max_iter:
        u1 = lo_u + step
        g1 = slope(u1)
        if abs(g1) < tol:
            return math.exp(u1)
        if (g1 > 0) != (lo_g > 0):
            break
        lo_u, lo_g, step = u1, g1, step * 2
        if abs(lo_u) > 20:  # T beyond e^±20: the data set is degenerate (e.g. all correct)
            return math.exp(lo_u)
    a, ga, b, gb = (lo_u, lo_g, u1, g1) if lo_u < u1 else (u1, g1, lo_u, lo_g)
    # Illinois-safeguarded regula falsi on [a, b] with slope(a) < 0 < slope(b).
    side = 0
    while evals < max_iter:
        u = (a * gb - b * ga) / (gb - ga)
        if not a < u < b:
            u = 0.5 * (a + b)
        g = slope(u)
        if abs(g) < tol or b - a < 1e-12:
            return math.exp(u)
        if (g > 0) == (gb > 0):
            b, gb = u, g
            if side == 1:
                ga *= 0.5
            side = 1
        else:
            a, ga = u, g
            if side == -1:
                gb *= 0.5
            side = -1
    return math.exp(0.5 * (a + b))
