"""Histogram-binned calibration metrics (CONTRACT §2) on the fused calibration_bins op: ECE, MCE,
RMSCE, classwise ECE, AdaECE and the reliability-diagram table; and a streaming meter whose
O(n_bins) state all-reduces across torch.distributed."""

from dataclasses import dataclass, fields
from typing import Optional

import torch

from . import ops

NORMS = ("l1", "max", "l2")


def bin_boundaries(n_bins: int, device=None) -> torch.Tensor:
    """The float32 boundaries every backend compares against: torch.linspace(0, 1, n_bins + 1)."""
    return torch.linspace(0, 1, n_bins + 1, dtype=torch.float32, device=device)


def _check(input, target, n_bins, from_logits, norm=None):
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError("calibration: logits / probabilities and target must be tensors")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"calibration: n_bins must be an int >= 1, got {n_bins!r}")
    if norm is not None and norm not in NORMS:
        raise ValueError(f"calibration: norm must be one of {NORMS}, got {norm!r}")
    if not input.is_floating_point():
        raise ValueError(f"calibration: logits / probabilities must be floating, got {input.dtype}")
    if input.dim() != 2:
        raise ValueError(f"calibration: logits / probabilities must be 2-D (N, C), got shape "
                         f"{tuple(input.shape)}")
    if target.dtype != torch.int64 or tuple(target.shape) != (input.shape[0],):
        raise ValueError(f"calibration: target must hold int64 class indices of shape "
                         f"({input.shape[0]},), got {target.dtype} of shape {tuple(target.shape)}")
    if not isinstance(from_logits, bool):
        raise ValueError(f"calibration: from_logits must be a bool, got {from_logits!r}")


@dataclass
class CalibrationState:
    """Per-bin sums: counts and hits (correct predictions) are int64, conf_sums float64. The
    classwise fields are (C, n_bins) with hits counting samples of class k, or None."""

    counts: torch.Tensor
    conf_sums: torch.Tensor
    hits: torch.Tensor
    cw_counts: Optional[torch.Tensor] = None
    cw_conf_sums: Optional[torch.Tensor] = None
    cw_hits: Optional[torch.Tensor] = None

    def __add__(self, other: "CalibrationState") -> "CalibrationState":
        def add(a, b):
            return None if a is None else a + b
        return CalibrationState(*(add(getattr(self, f.name), getattr(other, f.name))
                                  for f in fields(self)))

    @property
    def n_samples(self) -> torch.Tensor:
        return self.counts.sum()


def calibration_bins(input, target, n_bins=15, *, from_logits=True, ignore_index=-100,
                     classwise=False, backend="auto"):
    """The binned state of one batch, from the fused kernel (reads the logits once)."""
    _check(input, target, n_bins, from_logits)
    op = _op(backend, input)
    out = op(input, target, bin_boundaries(n_bins, input.device), from_logits, int(ignore_index),
             classwise, False)
    return CalibrationState(out[0], out[1], out[2], *(out[3:6] if classwise else (None,) * 3))


def _op(backend, x):
    from .focal_loss import resolve_backend

    if backend not in ("auto", "cpu", "cuda", "triton"):
        raise ValueError(f"calibration: backend must be 'auto', 'cpu', 'cuda' or 'triton', "
                         f"got {backend!r}")
    backend = resolve_backend(backend, x.device, "calibration", x.shape[-1] * x.element_size())
    if backend == "torch":
        raise ValueError(f"calibration: no fused kernel for {x.device} tensors")
    return ops.calibration_bins_triton if backend == "triton" else ops.calibration_bins


def binned_error(counts, conf_sums, hits, norm="l1"):
    """ECE ("l1") / MCE ("max") / RMSCE ("l2") from a binned state, in float64 (NaN if empty)."""
    n = counts.sum(-1, keepdim=True).double()
    nonempty = counts > 0
    safe = counts.clamp_min(1).double()
    gap = torch.where(nonempty, (hits.double() / safe - conf_sums / safe).abs(), 0.0)
    if norm == "l1":
        err = (counts.double() / n * gap).sum(-1)
    elif norm == "l2":
        err = (counts.double() / n * gap**2).sum(-1).sqrt()
    else:
        err = torch.where(nonempty, gap, float("-inf")).amax(-1)
    return torch.where(n.squeeze(-1) > 0, err, float("nan"))


def calibration_error(logits_or_probs, target, n_bins=15, norm="l1", from_logits=True,
                      ignore_index=-100, *, backend="auto"):
    """Top-label calibration error with equal-width bins (lo, hi]: norm "l1" is the ECE, "max"
    the MCE, "l2" the RMSCE. Samples whose target is ignore_index are left out."""
    _check(logits_or_probs, target, n_bins, from_logits, norm)
    s = calibration_bins(logits_or_probs, target, n_bins, from_logits=from_logits,
                         ignore_index=ignore_index, backend=backend)
    return binned_error(s.counts, s.conf_sums, s.hits, norm)


def ece(logits_or_probs, target, n_bins=15, from_logits=True, ignore_index=-100, **kw):
    """Expected calibration error (Guo et al. 2017; the paper's ECE)."""
    return calibration_error(logits_or_probs, target, n_bins, "l1", from_logits, ignore_index, **kw)


def mce(logits_or_probs, target, n_bins=15, from_logits=True, ignore_index=-100, **kw):
    """Maximum calibration error over non-empty bins."""
    return calibration_error(logits_or_probs, target, n_bins, "max", from_logits, ignore_index,
                             **kw)


def rmsce(logits_or_probs, target, n_bins=15, from_logits=True, ignore_index=-100, **kw):
    """Root-mean-square calibration error."""
    return calibration_error(logits_or_probs, target, n_bins, "l2", from_logits, ignore_index,
                             **kw)


def classwise_ece_from_state(cw_counts, cw_conf_sums, cw_hits):
    return binned_error(cw_counts, cw_conf_sums, cw_hits, "l1").mean()


def classwise_ece(logits_or_probs, target, n_bins=15, from_logits=True, ignore_index=-100, *,
                  backend="auto"):
    """The paper's classwise ECE: for each class k, p_ik of every sample binned as above, the
    accuracy of a bin being the fraction of its samples of class k; the mean over classes."""
    s = calibration_bins(logits_or_probs, target, n_bins, from_logits=from_logits,
                         ignore_index=ignore_index, classwise=True, backend=backend)
    return classwise_ece_from_state(s.cw_counts, s.cw_conf_sums, s.cw_hits)


def per_sample(logits_or_probs, target, *, from_logits=True, ignore_index=-100, backend="auto"):
    """(confidence, correct) of every non-ignored sample, from the fused kernel."""
    _check(logits_or_probs, target, 1, from_logits)
    out = _op(backend, logits_or_probs)(
        logits_or_probs, target, bin_boundaries(1, logits_or_probs.device), from_logits,
        int(ignore_index), False, True)
    keep = target != ignore_index
    return out[6][keep], out[7][keep]


def adaptive_ece_from_samples(confidence, correct, n_bins=15):
    """AdaECE: sort the confidences (stable), split them into n_bins contiguous groups whose sizes
    differ by at most one (torch.tensor_split's sizes), ECE over those groups. Every sample
    counts (the paper's code drops those equal to the smallest confidence)."""
    n = confidence.numel()
    if n == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=confidence.device)
    conf, order = torch.sort(confidence, stable=True)
    hit = correct[order].double()
    base, extra = divmod(n, n_bins)
    sizes = torch.full((n_bins,), base, dtype=torch.int64, device=conf.device)
    sizes[:extra] += 1
    ends = sizes.cumsum(0)
    # Group sums from prefix sums (a scan: deterministic on every device).
    conf_cum = torch.cat([conf.new_zeros(1, dtype=torch.float64), conf.double().cumsum(0)])
    hit_cum = torch.cat([hit.new_zeros(1), hit.cumsum(0)])
    conf_sum = conf_cum[ends] - conf_cum[ends - sizes]
    hit_sum = hit_cum[ends] - hit_cum[ends - sizes]
    return binned_error(sizes, conf_sum, hit_sum, "l1")


def adaptive_ece(logits_or_probs, target, n_bins=15, from_logits=True, ignore_index=-100, *,
                 backend="auto"):
    """Adaptive (equal-mass) ECE of the paper, counting every sample."""
    _check(logits_or_probs, target, n_bins, from_logits)
    conf, correct = per_sample(logits_or_probs, target, from_logits=from_logits,
                               ignore_index=ignore_index, backend=backend)
    return adaptive_ece_from_samples(conf, correct, n_bins)


def reliability_table(logits_or_probs, target, n_bins=15, from_logits=True, ignore_index=-100,
                      *, backend="auto"):
    """Per bin: lower and upper edge, count, mean confidence and accuracy (NaN where empty)."""
    s = calibration_bins(logits_or_probs, target, n_bins, from_logits=from_logits,
                         ignore_index=ignore_index, backend=backend)
    return table_from_state(s)


def table_from_state(s: CalibrationState):
    beta = bin_boundaries(s.counts.numel(), s.counts.device).double()
    empty = s.counts == 0
    safe = s.counts.clamp_min(1).double()
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=s.counts.device)
    return {"lower": beta[:-1], "upper": beta[1:], "count": s.counts,
            "confidence": torch.where(empty, nan, s.conf_sums / safe),
            "accuracy": torch.where(empty, nan, s.hits.double() / safe)}


class CalibrationMeter:
    """Streaming calibration metrics: update() per batch, compute() at the end.

    The state is O(n_bins) (plus C x n_bins with classwise=True), so ``sync()`` all-reduces a few
    numbers over torch.distributed (gloo or nccl) and every rank then holds the global state:
    integer counts exactly, float64 sums to within rounding (1e-12). AdaECE (adaptive=True) is
    exact, and so needs every sample's confidence and correctness: 5 bytes a sample, gathered
    from every rank by sync().
    """

    def __init__(self, n_bins=15, *, from_logits=True, ignore_index=-100, classwise=False,
                 adaptive=False, backend="auto"):
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"CalibrationMeter: n_bins must be an int >= 1, got {n_bins!r}")
        self.n_bins, self.from_logits, self.ignore_index = n_bins, from_logits, ignore_index
        self.classwise, self.adaptive, self.backend = classwise, adaptive, backend
        self.reset()

    def reset(self):
        self.state: Optional[CalibrationState] = None
        self._samples = []  # (confidence, correct) chunks, for AdaECE
        self._synced = False

    @torch.no_grad()
    def update(self, logits_or_probs, target):
        _check(logits_or_probs, target, self.n_bins, self.from_logits)
        if self._synced:
            raise RuntimeError("CalibrationMeter: update() after sync(); reset() first")
        out = _op(self.backend, logits_or_probs)(
            logits_or_probs, target, bin_boundaries(self.n_bins, logits_or_probs.device),
            self.from_logits, int(self.ignore_index), self.classwise, self.adaptive)
        s = CalibrationState(out[0], out[1], out[2],
                             *(out[3:6] if self.classwise else (None,) * 3))
        if self.state is not None and self.classwise and \
                s.cw_counts.shape != self.state.cw_counts.shape:
            raise ValueError(f"CalibrationMeter: {s.cw_counts.shape[0]} classes in this batch, "
                             f"{self.state.cw_counts.shape[0]} before")
        self.state = s if self.state is None else self.state + s
        if self.adaptive:
            keep = target != self.ignore_index
            self._samples.append((out[6][keep], out[7][keep]))

    def compute(self):
        """{"ece", "mce", "rmsce", "n"} (+ "classwise_ece", "adaptive_ece"), float64 tensors."""
        if self.state is None:
            raise RuntimeError("CalibrationMeter: compute() before any update()")
        s = self.state
        out = {"ece": binned_error(s.counts, s.conf_sums, s.hits, "l1"),
               "mce": binned_error(s.counts, s.conf_sums, s.hits, "max"),
               "rmsce": binned_error(s.counts, s.conf_sums, s.hits, "l2"),
               "n": s.n_samples}
        if self.classwise:
            out["classwise_ece"] = classwise_ece_from_state(s.cw_counts, s.cw_conf_sums,
                                                            s.cw_hits)
        if self.adaptive:
            conf, correct = self._all_samples()
            out["adaptive_ece"] = adaptive_ece_from_samples(conf, correct, self.n_bins)
        return out

    def table(self):
        """The reliability-diagram table of the accumulated state."""
        if self.state is None:
            raise RuntimeError("CalibrationMeter: table() before any update()")
        return table_from_state(self.state)

    def _all_samples(self):
        if not self._samples:
            dev = self.state.counts.device
            return torch.empty(0, device=dev), torch.empty(0, dtype=torch.bool, device=dev)
        return torch.cat([c for c, _ in self._samples]), torch.cat([h for _, h in self._samples])

    def state_dict(self):
        if self.state is None:
            return {"n_bins": self.n_bins}
        d = {"n_bins": self.n_bins}
        d.update({f.name: getattr(self.state, f.name) for f in fields(self.state)
                  if getattr(self.state, f.name) is not None})
        if self.adaptive:
            d["confidence"], d["correct"] = self._all_samples()
        return d

    def load_state_dict(self, d):
        if d["n_bins"] != self.n_bins:
            raise ValueError(f"CalibrationMeter: state has {d['n_bins']} bins, this meter "
                             f"{self.n_bins}")
        self.reset()
        if "counts" in d:
            self.state = CalibrationState(*(d.get(f.name) for f in fields(CalibrationState)))
        if "confidence" in d:
            self._samples = [(d["confidence"], d["correct"])]

    def sync(self, process_group=None):
        """All-reduce (SUM) the binned state over a torch.distributed group; afterwards every rank
        holds the global state. Call once, after the last update()."""
        import torch.distributed as dist

        if self._synced:
            raise RuntimeError("CalibrationMeter: already synced; reset() before reuse")
        if self.state is None:
            raise RuntimeError("CalibrationMeter: sync() before any update()")
        for f in fields(self.state):
            t = getattr(self.state, f.name)
            if t is not None:
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=process_group)
        if self.adaptive:
            conf, correct = self._all_samples()
            self._samples = [_all_gather_uneven(conf, process_group),
                             _all_gather_uneven(correct, process_group)]
            self._samples = [tuple(self._samples)]
        self._synced = True
        return self


def _all_gather_uneven(t, group):
    import torch.distributed as dist

    if t.dtype == torch.bool:  # not every backend gathers bool
        return _all_gather_uneven(t.to(torch.uint8), group).bool()
    world = dist.get_world_size(group)
    size = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])
