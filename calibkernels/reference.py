"""Eager PyTorch reference implementations: the source of truth for tests and benchmarks.

Written the way a user would write them in plain PyTorch, computing in the input's dtype.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn import _reduction

from .schedule import as_schedule

REDUCTIONS = ("none", "mean", "sum")


def focal_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
               reduction="mean", label_smoothing=0.0, *, gamma=3.0):
    """Softmax focal loss of CONTRACT §1 (the paper's FL-gamma / FLSD), eager PyTorch, with
    F.cross_entropy's signature: class-index or class-probability targets."""
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    schedule = as_schedule(gamma)
    eps = float(label_smoothing)
    prob_target = target.is_floating_point()
    out_shape = target.shape[:1] + target.shape[2:] if prob_target and target.dim() > 1 else \
        (() if prob_target else target.shape)
    if input.dim() == 1:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    n_classes = input.shape[1]
    x = input.movedim(1, -1).reshape(-1, n_classes) if input.dim() > 2 else input
    logp = F.log_softmax(x, dim=1)
    w = weight.to(x.dtype) if weight is not None else None

    if prob_target:
        t = target.movedim(1, -1).reshape(-1, n_classes).to(x.dtype) if target.dim() > 2 \
            else target.to(x.dtype)
        # gamma from sum_k t_k p_k, the probability the target puts on the prediction
        g = schedule.gamma_per_sample((t * logp.exp()).sum(1))
        a = (1.0 - eps) * t + eps / n_classes
        if w is not None:
            a = a * w
        loss = -(a * (-torch.expm1(logp)).pow(g.unsqueeze(1)) * logp).sum(1)
        if reduction == "none":
            return loss.reshape(out_shape)
        return loss.sum() if reduction == "sum" else loss.mean()

    t = target.reshape(-1)
    valid = t != ignore_index
    t_safe = torch.where(valid, t, torch.zeros_like(t))
    logp_y = logp.gather(1, t_safe.unsqueeze(1)).squeeze(1)
    g = schedule.gamma_per_sample(logp_y.exp())  # chosen from p_y, no gradient through the choice
    w_y = w[t_safe] if w is not None else torch.ones_like(logp_y)
    w_y = w_y * valid

    # (1 - p)^gamma, with 1 - p as -expm1(log p)
    focal_y = (-torch.expm1(logp_y)).pow(g) * logp_y
    if eps == 0.0:
        loss = -w_y * focal_y
    else:
        focal = (-torch.expm1(logp)).pow(g.unsqueeze(1)) * logp
        if w is not None:
            focal = focal * w
        loss = -((1.0 - eps) * w_y * focal_y + (eps / n_classes) * focal.sum(1) * valid)

    if reduction == "none":
        return loss.reshape(out_shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / w_y.sum()


# ---- calibration metrics (CONTRACT §2), eager: a mask per bin ----

def _boundaries(n_bins, device):
    return torch.linspace(0, 1, n_bins + 1, dtype=torch.float32).to(device)  # CPU linspace


def _bin_of(c, n_bins):
    """bin(c) = #{j in 1..n_bins-1 : boundaries[j] < c}, with the float32 boundaries."""
    wide = torch.float64 if c.dtype == torch.float64 else torch.float32  # exact for c and edges
    inner = _boundaries(n_bins, c.device)[1:-1].to(wide)
    return (c.to(wide).unsqueeze(-1) > inner).sum(-1)


def _rows(x, target):
    """(N, C, d1, ..., dk) input and (N, d1, ..., dk) target as rows (N·d1···dk, C) and (N·...)."""
    if x.dim() > 2:
        x = x.movedim(1, -1).reshape(-1, x.shape[1])
    return x, target.reshape(-1)


def _probs(x, target, from_logits, ignore_index):
    """The kept samples' probabilities (float32, or float64 for float64 input) and targets.
    from_logits=None takes the input as probabilities when every value lies in [0, 1]."""
    x, target = _rows(x, target)
    keep = target != ignore_index
    x, target = x[keep], target[keep]
    if from_logits is None:
        from_logits = not bool(((x >= 0) & (x <= 1)).all())
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(wide).softmax(1) if from_logits else x.to(wide)), target


def calibration_error(x, target, n_bins=15, norm="l1", from_logits=None, ignore_index=-100):
    """Top-label ECE ("l1"), MCE ("max") or RMSCE ("l2"), in float64."""
    p, t = _probs(x, target, from_logits, ignore_index)
    conf, pred = p.max(1)
    correct = ((pred == t) & ~conf.isnan()).double()  # a NaN confidence: never correct
    conf64, bins = conf.double(), _bin_of(conf, n_bins)
    n = len(conf)
    if n == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    gaps, weights = [], []
    for b in range(n_bins):
        m = bins == b
        if m.any():
            gaps.append((correct[m].mean() - conf64[m].mean()).abs())
            weights.append(m.sum().double() / n)
    gaps, weights = torch.stack(gaps), torch.stack(weights)
    if norm == "l1":
        return (weights * gaps).sum()
    if norm == "max":
        return gaps.max()
    return (weights * gaps**2).sum().sqrt()


def classwise_ece(x, target, n_bins=15, from_logits=None, ignore_index=-100):
    """The paper's classwise ECE: per class k, bin p_ik of every sample; mean over all C."""
    p, t = _probs(x, target, from_logits, ignore_index)
    n, c = p.shape
    if n == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for k in range(c):
        pk, hit = p[:, k], (t == k).double()
        bins = _bin_of(pk, n_bins)
        for b in range(n_bins):
            m = bins == b
            if m.any():
                total += m.sum().double() / n * (hit[m].mean() - pk[m].double().mean()).abs()
    return total / c


def adaptive_ece(x, target, n_bins=15, from_logits=None, ignore_index=-100):
    """AdaECE with the paper's groups: edges np.interp(linspace(0, N, n_bins + 1), arange(N),
    sorted confidences) in float64, compared in float32; bins (lo, hi], the first closed."""
    p, t = _probs(x, target, from_logits, ignore_index)
    conf, pred = p.max(1)
    correct = ((pred == t) & ~conf.isnan()).double()  # a NaN confidence: never correct
    n = len(conf)
    if n == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    edges = np.interp(np.linspace(0, n, n_bins + 1), np.arange(n),
                      np.sort(conf.double().numpy()))
    edges = torch.from_numpy(edges).to(conf.dtype)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(n_bins):
        m = (conf > edges[b]) & (conf <= edges[b + 1])
        if b == 0:
            m |= conf == edges[0]
        if m.any():
            total += m.sum().double() / n * (correct[m].mean() - conf[m].double().mean()).abs()
    return total


def brier_score(x, target, from_logits=None, ignore_index=-100):
    """Mean over samples of sum_k (p_k - onehot(y)_k)^2, in float64."""
    p, t = _probs(x, target, from_logits, ignore_index)
    onehot = F.one_hot(t, p.shape[1]).to(p.dtype)
    return ((p - onehot) ** 2).sum(1).double().mean()


def nll(x, target, from_logits=None, ignore_index=-100):
    """Mean -log p_y, in float64."""
    p, t = _probs(x, target, from_logits, ignore_index)
    return (-p.gather(1, t[:, None]).log()).double().mean()
