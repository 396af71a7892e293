"""Eager PyTorch reference implementations: the source of truth for tests and benchmarks.

Written the way a user would write them in plain PyTorch, computing in the input's dtype.
"""

import torch
import torch.nn.functional as F

from .schedule import as_schedule

REDUCTIONS = ("none", "mean", "sum")


def focal_loss(logits, target, gamma=3.0, *, weight=None, ignore_index=-100, reduction="mean",
               label_smoothing=0.0):
    """Softmax focal loss of CONTRACT §1 (the paper's FL-gamma / FLSD), eager PyTorch."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    schedule = as_schedule(gamma)
    eps = float(label_smoothing)
    out_shape = target.shape
    if logits.dim() == 1:
        logits, target = logits.unsqueeze(0), target.unsqueeze(0)
    n_classes = logits.shape[1]
    x = logits.movedim(1, -1).reshape(-1, n_classes) if logits.dim() > 2 else logits
    t = target.reshape(-1)
    valid = t != ignore_index
    t_safe = torch.where(valid, t, torch.zeros_like(t))

    logp = F.log_softmax(x, dim=1)
    logp_y = logp.gather(1, t_safe.unsqueeze(1)).squeeze(1)
    g = schedule.gamma_per_sample(logp_y.exp())  # chosen from p_y, no gradient through the choice
    w_y = weight.to(x.dtype)[t_safe] if weight is not None else torch.ones_like(logp_y)
    w_y = w_y * valid

    # (1 - p)^gamma, with 1 - p as -expm1(log p)
    focal_y = (-torch.expm1(logp_y)).pow(g) * logp_y
    if eps == 0.0:
        loss = -w_y * focal_y
    else:
        focal = (-torch.expm1(logp)).pow(g.unsqueeze(1)) * logp
        if weight is not None:
            focal = focal * weight.to(x.dtype)
        loss = -((1.0 - eps) * w_y * focal_y + (eps / n_classes) * focal.sum(1) * valid)

    if reduction == "none":
        return loss.reshape(out_shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / w_y.sum()
