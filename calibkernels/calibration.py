"""Histogram-binned calibration metrics (CONTRACT §2) on the fused calibration_bins op: ECE, MCE,
RMSCE, classwise ECE, AdaECE, Brier score, NLL and the reliability-diagram table; the whole
report and the temperature sweep from one read of the logits; and a streaming meter whose
O(n_bins) state all-reduces across torch.distributed."""

import operator
from dataclasses import dataclass, fields
from typing import Optional

import torch

from . import ops

NORMS = ("l1", "max", "l2")
# The Triton kernels hold the bins as register tiles: 1024 bins compile without spilling on
# sm_90, 4096 spill 35 KB a thread (tests/test_triton_compile.py); the CUDA C++ ones take any.
TRITON_MAX_BINS = 1024
# calibration_bins' mode argument (csrc/ops.h): from_logits=None decides from the values
_MODES = {None: -1, True: 1, False: 0}


_BOUNDARIES = {}


def bin_boundaries(n_bins: int, device=None) -> torch.Tensor:
    """The float32 boundaries every backend compares against: torch.linspace(0, 1, n_bins + 1)
    computed on the CPU (as the paper's code has them; a GPU's linspace may round otherwise), one
    copy per device, made once."""
    device = torch.device("cpu" if device is None else device)
    key = (n_bins, device)
    if key not in _BOUNDARIES:
        cpu = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32)
        _BOUNDARIES[key] = cpu.to(device)
    return _BOUNDARIES[key]


def as_n_bins(n_bins, what="calibration") -> int:
    """n_bins as an int >= 1: a Python or NumPy integer, or a 0-d integer tensor."""
    try:
        if isinstance(n_bins, bool):
            raise TypeError
        value = operator.index(n_bins)
    except TypeError:
        raise ValueError(f"{what}: n_bins must be an integer >= 1, got {n_bins!r}") from None
    if value < 1:
        raise ValueError(f"{what}: n_bins must be an integer >= 1, got {value}")
    return value


def _mode(from_logits, what="calibration"):
    if from_logits is not None and not isinstance(from_logits, bool):
        raise ValueError(f"{what}: from_logits must be True, False or None (decide from the "
                         f"values, as torchmetrics), got {from_logits!r}")
    return _MODES[from_logits]


def as_rows(input, target, what="calibration"):
    """Logits or probabilities of shape (N, C), (N, C, d1, ..., dk) or (C,) and class-index targets
    of shape (N), (N, d1, ..., dk) or (), as rows (N·d1···dk, C) and (N·d1···dk): each position is
    a sample, the class dimension is 1 (as the loss's)."""
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError(f"{what}: logits / probabilities and target must be tensors")
    ops.check_float(input, f"{what}: logits / probabilities")
    if target.dtype not in (torch.int64, torch.uint8):
        raise ValueError(f"{what}: target must hold class indices (int64 or uint8), got "
                         f"{target.dtype}")
    if input.dim() == 0:
        raise ValueError(f"{what}: logits / probabilities need a class dimension")
    expected = (input.shape[0],) + tuple(input.shape[2:]) if input.dim() >= 2 else ()
    if tuple(target.shape) != expected:
        raise ValueError(f"{what}: target must have shape {expected} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    if input.dim() == 1:
        return input.unsqueeze(0), target.reshape(1)
    if input.dim() > 2:
        input = input.movedim(1, -1).reshape(-1, input.shape[1])
    return input, target.reshape(-1)


@dataclass
class CalibrationState:
    """Per-bin sums: counts and hits (correct predictions) are int64, conf_sums float64; the
    classwise fields are (C, n_bins) with hits counting samples of class k, or None; brier and
    nll are float64 sums over the samples."""

    counts: torch.Tensor
    conf_sums: torch.Tensor
    hits: torch.Tensor
    cw_counts: Optional[torch.Tensor] = None
    cw_conf_sums: Optional[torch.Tensor] = None
    cw_hits: Optional[torch.Tensor] = None
    brier: Optional[torch.Tensor] = None
    nll: Optional[torch.Tensor] = None

    def __add__(self, other: "CalibrationState") -> "CalibrationState":
        def add(a, b):
            return None if a is None else a + b
        return CalibrationState(*(add(getattr(self, f.name), getattr(other, f.name))
                                  for f in fields(self)))

    def to(self, device) -> "CalibrationState":
        return CalibrationState(*(None if t is None else t.to(device)
                                  for t in (getattr(self, f.name) for f in fields(self))))

    @property
    def n_samples(self) -> torch.Tensor:
        return self.counts.sum()

    @classmethod
    def zeros(cls, n_bins, n_classes=None, device=None):
        i64 = dict(dtype=torch.int64, device=device)
        f64 = dict(dtype=torch.float64, device=device)
        cw = () if n_classes is None else (torch.zeros(n_classes, n_bins, **i64),
                                           torch.zeros(n_classes, n_bins, **f64),
                                           torch.zeros(n_classes, n_bins, **i64))
        return cls(torch.zeros(n_bins, **i64), torch.zeros(n_bins, **f64),
                   torch.zeros(n_bins, **i64), *(cw or (None,) * 3),
                   torch.zeros((), **f64), torch.zeros((), **f64))


def _kernel(backend, x, n_bins, what="calibration"):
    """The backend that runs a calibration op on rows x: "cpu", "cuda" or "triton". "auto" on
    CUDA takes Triton for long rows (see focal_loss.resolve_backend) up to TRITON_MAX_BINS."""
    from .focal_loss import resolve_backend

    if backend not in ("auto", "cpu", "cuda", "triton"):
        raise ValueError(f"{what}: backend must be 'auto', 'cpu', 'cuda' or 'triton', "
                         f"got {backend!r}")
    kernel = resolve_backend(backend, x.device, "calibration", x.shape[-1] * x.element_size())
    if kernel == "torch":
        raise ValueError(f"{what}: no fused kernel for {x.device} tensors")
    if kernel == "triton" and backend == "auto" and n_bins > TRITON_MAX_BINS:
        return "cuda"
    if kernel == "triton":
        ops.load_triton()
    return kernel


def _op(backend, x, n_bins):
    return ops.calibration_bins_triton if _kernel(backend, x, n_bins) == "triton" \
        else ops.calibration_bins


def _fused(rows, target, n_bins, from_logits, ignore_index, classwise, per_sample, backend):
    """The calibration_bins op's outputs on rows (csrc/calibkernels.cpp lists them)."""
    return _op(backend, rows, n_bins)(rows, target, bin_boundaries(n_bins, rows.device),
                              _mode(from_logits), int(ignore_index), classwise, per_sample)


def _bins(rows, target, n_bins, from_logits, ignore_index, classwise, per_sample, backend):
    """calibration_bins on rows: (CalibrationState, confidence, correct)."""
    out = _fused(rows, target, n_bins, from_logits, ignore_index, classwise, per_sample, backend)
    state = CalibrationState(out[0], out[1], out[2],
                             *(out[3:6] if classwise else (None,) * 3), out[8][0], out[8][1])
    return state, out[6], out[7]


def calibration_bins(input, target, n_bins=15, *, from_logits=None, ignore_index=-100,
                     classwise=False, backend="auto"):
    """The binned state of one batch, from the fused kernel (reads the input once).
    from_logits=None reads the input as probabilities when every value of a non-ignored sample
    lies in [0, 1] and as logits otherwise (torchmetrics' rule); True / False force either."""
    n_bins = as_n_bins(n_bins)
    rows, target = as_rows(input, target)
    return _bins(rows, target, n_bins, from_logits, ignore_index, classwise, False, backend)[0]


def binned_errors(counts, conf_sums, hits):
    """ECE, MCE and RMSCE of a binned state, stacked on the last dimension (float64)."""
    return torch.stack([binned_error(counts, conf_sums, hits, norm) for norm in NORMS], -1)


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


def calibration_error(logits_or_probs, target, n_bins=15, norm="l1", from_logits=None,
                      ignore_index=-100, *, backend="auto"):
    """Top-label calibration error with equal-width bins (lo, hi]: norm "l1" is the ECE, "max"
    the MCE, "l2" the RMSCE. Samples whose target is ignore_index are left out."""
    if norm not in NORMS:
        raise ValueError(f"calibration: norm must be one of {NORMS}, got {norm!r}")
    rows, target = as_rows(logits_or_probs, target)
    out = _fused(rows, target, as_n_bins(n_bins), from_logits, ignore_index, False, False, backend)
    return out[8][3 + NORMS.index(norm)]  # computed by the kernel from the state it formed


def ece(logits_or_probs, target, n_bins=15, from_logits=None, ignore_index=-100, **kw):
    """Expected calibration error (Guo et al. 2017; the paper's ECE)."""
    return calibration_error(logits_or_probs, target, n_bins, "l1", from_logits, ignore_index, **kw)


def mce(logits_or_probs, target, n_bins=15, from_logits=None, ignore_index=-100, **kw):
    """Maximum calibration error over non-empty bins."""
    return calibration_error(logits_or_probs, target, n_bins, "max", from_logits, ignore_index,
                             **kw)


def rmsce(logits_or_probs, target, n_bins=15, from_logits=None, ignore_index=-100, **kw):
    """Root-mean-square calibration error."""
    return calibration_error(logits_or_probs, target, n_bins, "l2", from_logits, ignore_index,
                             **kw)


def classwise_ece_from_state(cw_counts, cw_conf_sums, cw_hits):
    """The mean over all C classes of each class's ECE (NaN when there is no sample)."""
    return binned_error(cw_counts, cw_conf_sums, cw_hits, "l1").mean()


def classwise_ece(logits_or_probs, target, n_bins=15, from_logits=None, ignore_index=-100, *,
                  backend="auto"):
    """The paper's classwise ECE: for each class k, p_ik of every sample binned as above, the
    accuracy of a bin being the fraction of its samples of class k; the mean over all C classes
    (the paper's code averages over max(target) + 1 classes)."""
    s = calibration_bins(logits_or_probs, target, n_bins, from_logits=from_logits,
                         ignore_index=ignore_index, classwise=True, backend=backend)
    return classwise_ece_from_state(s.cw_counts, s.cw_conf_sums, s.cw_hits)


def per_sample(logits_or_probs, target, *, from_logits=None, ignore_index=-100, backend="auto"):
    """(confidence, correct) of every non-ignored sample, from the fused kernel (a sample whose
    confidence is NaN, from a NaN or +inf logit, is not correct)."""
    rows, target = as_rows(logits_or_probs, target)
    _, conf, correct = _bins(rows, target, 1, from_logits, ignore_index, False, True, backend)
    keep = target != ignore_index
    return conf[keep], correct[keep]


def _interp_at_ranks(sorted_conf, n_bins):
    """The paper's AdaECE edges, np.interp(np.linspace(0, N, n_bins + 1), np.arange(N), sorted)
    in float64, with numpy's arithmetic (slope (f[j+1] - f[j]) / 1, then slope (x - j) + f[j])."""
    n = sorted_conf.numel()
    f = sorted_conf.double()
    pos = torch.linspace(0, n, n_bins + 1, dtype=torch.float64, device=f.device)
    j = pos.floor().clamp(max=n - 1).long()
    nxt = (j + 1).clamp(max=n - 1)
    edges = (f[nxt] - f[j]) * (pos - j.double()) + f[j]
    return torch.where(pos >= n - 1, f[n - 1], edges)


def adaptive_ece_from_samples(confidence, correct, n_bins=15):
    """AdaECE over the paper's groups (Mukhoti et al., code Metrics/metrics.py): edges interpolated
    at ranks i·N/n_bins of the sorted confidences in float64, compared with the confidences in
    their own dtype (float32, as the paper's code compares a float32 tensor with the edges), bins
    (lo, hi] so that tied confidences stay in one group, and the first bin closed: the paper's
    code drops the samples equal to the smallest confidence; every sample counts here."""
    n_bins = as_n_bins(n_bins, "adaptive_ece")
    n = confidence.numel()
    if n == 0 or bool(confidence.isnan().any()):
        return torch.tensor(float("nan"), dtype=torch.float64, device=confidence.device)
    conf, order = torch.sort(confidence, stable=True)
    hit = correct[order].double()
    edges = _interp_at_ranks(conf, n_bins).to(conf.dtype)
    # samples at or below each edge (the sorted order makes each group a contiguous slice)
    upto = torch.searchsorted(conf, edges, right=True)
    upto[0] = 0  # the first bin is closed: it starts at the first sample
    starts, ends = upto[:-1], upto[1:]
    sizes = ends - starts
    conf_cum = torch.cat([conf.new_zeros(1, dtype=torch.float64), conf.double().cumsum(0)])
    hit_cum = torch.cat([hit.new_zeros(1), hit.cumsum(0)])
    return binned_error(sizes, conf_cum[ends] - conf_cum[starts], hit_cum[ends] - hit_cum[starts],
                        "l1")


def adaptive_ece(logits_or_probs, target, n_bins=15, from_logits=None, ignore_index=-100, *,
                 backend="auto"):
    """Adaptive (equal-mass) ECE with the paper's groups, counting every sample."""
    n_bins = as_n_bins(n_bins)
    conf, correct = per_sample(logits_or_probs, target, from_logits=from_logits,
                               ignore_index=ignore_index, backend=backend)
    return adaptive_ece_from_samples(conf, correct, n_bins)


def reliability_table(logits_or_probs, target, n_bins=15, from_logits=None, ignore_index=-100,
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
    # a bin holding a NaN confidence has no accuracy either (its samples' hits are void)
    return {"lower": beta[:-1], "upper": beta[1:], "count": s.counts,
            "confidence": torch.where(empty, nan, s.conf_sums / safe),
            "accuracy": torch.where(empty | s.conf_sums.isnan(), nan, s.hits.double() / safe)}


def report_from_state(s: CalibrationState, samples=None):
    """Every metric of a binned state, as float64 tensors (n: int64); AdaECE when the samples
    (confidence, correct) are given."""
    n = s.n_samples
    nd = n.double()
    # a NaN confidence poisons accuracy too, as every other metric (on the device: no sync)
    poisoned = s.conf_sums.sum().isnan()
    accuracy = torch.where(poisoned, torch.nan, s.hits.sum().double() / nd)
    out = {"ece": binned_error(s.counts, s.conf_sums, s.hits, "l1"),
           "mce": binned_error(s.counts, s.conf_sums, s.hits, "max"),
           "rmsce": binned_error(s.counts, s.conf_sums, s.hits, "l2"),
           "brier": s.brier / nd, "nll": s.nll / nd, "accuracy": accuracy, "n": n}
    if s.cw_counts is not None:
        out["classwise_ece"] = classwise_ece_from_state(s.cw_counts, s.cw_conf_sums, s.cw_hits)
    if samples is not None:
        out["adaptive_ece"] = adaptive_ece_from_samples(*samples, s.counts.numel())
    return out


def calibration_report(logits_or_probs, target, n_bins=15, *, from_logits=None,
                       ignore_index=-100, backend="auto"):
    """Every metric at once: {"ece", "mce", "rmsce", "classwise_ece", "adaptive_ece", "brier",
    "nll", "accuracy", "n"}, all but AdaECE's sort from one fused read of the input (float64
    tensors; n the number of samples counted)."""
    n_bins = as_n_bins(n_bins)
    rows, target = as_rows(logits_or_probs, target)
    state, conf, correct = _bins(rows, target, n_bins, from_logits, ignore_index, True, True,
                                 backend)
    keep = target != ignore_index
    return report_from_state(state, (conf[keep], correct[keep]))


def calibration_sweep(logits, target, temperatures, n_bins=15, *, ignore_index=-100,
                      backend="auto"):
    """ECE and NLL of softmax(logits / T) at each of K <= 256 temperatures, from one read of the
    logits: {"ece": (K,), "nll": (K,)} float64 tensors (the paper's temperature search evaluates
    100 temperatures, one pass each)."""
    n_bins = as_n_bins(n_bins, "calibration_sweep")
    rows, target = as_rows(logits, target, "calibration_sweep")
    temps = torch.as_tensor(temperatures, dtype=torch.float64).detach().cpu().reshape(-1)
    if not 1 <= temps.numel() <= 256:
        raise ValueError(f"calibration_sweep: 1 to 256 temperatures, got {temps.numel()}")
    kernel = _kernel(backend, rows, n_bins, "calibration_sweep")
    op = ops.calibration_sweep_triton if kernel == "triton" else ops.calibration_sweep
    counts, conf_sums, hits, nll = op(rows, target, temps, bin_boundaries(n_bins, rows.device),
                                      int(ignore_index))
    n = counts[0].sum().double()
    return {"ece": binned_error(counts, conf_sums, hits, "l1"), "nll": nll / n}


class CalibrationMeter:
    """Streaming calibration metrics: update() per batch, compute() at the end.

    The state is O(n_bins) (plus C x n_bins with classwise=True), so ``sync()`` all-reduces a few
    numbers over torch.distributed (gloo or nccl) and every rank then holds the global state:
    integer counts exactly, float64 sums to within rounding (1e-12). AdaECE (adaptive=True) is
    exact, and so needs every sample's confidence and correctness: 5 bytes a sample, gathered
    from every rank by sync(). update() adds no host synchronisation on the GPU: the
    logits-or-probabilities rule is decided on the device, and ignored samples are dropped from
    the AdaECE samples only when they are read.
    """

    def __init__(self, n_bins=15, *, from_logits=None, ignore_index=-100, classwise=False,
                 adaptive=False, backend="auto", device=None):
        self.n_bins = as_n_bins(n_bins, "CalibrationMeter")
        _mode(from_logits, "CalibrationMeter")
        self.from_logits, self.ignore_index = from_logits, ignore_index
        self.classwise, self.adaptive, self.backend = classwise, adaptive, backend
        self.device = None if device is None else torch.device(device)
        self.reset()

    def reset(self):
        self.state: Optional[CalibrationState] = None  # this rank's own updates
        self._samples = []  # (confidence, correct, keep) per update, for AdaECE
        self._synced = None  # (global state, global samples) after sync(), until the next update
        return self

    @torch.no_grad()
    def update(self, logits_or_probs, target):
        rows, target = as_rows(logits_or_probs, target, "CalibrationMeter")
        s, conf, correct = _bins(rows, target, self.n_bins, self.from_logits, self.ignore_index,
                                 self.classwise, self.adaptive, self.backend)
        if self.state is not None and self.classwise and \
                s.cw_counts.shape != self.state.cw_counts.shape:
            raise ValueError(f"CalibrationMeter: {s.cw_counts.shape[0]} classes in this batch, "
                             f"{self.state.cw_counts.shape[0]} before")
        self.state = s if self.state is None else self.state + s.to(self.state.counts.device)
        if self.adaptive:
            self._samples.append((conf, correct, target != self.ignore_index))
        self._synced = None
        return self

    def _local_samples(self):
        dev = self.state.counts.device if self.state is not None else (self.device or "cpu")
        if not self._samples:
            return torch.empty(0, device=dev), torch.empty(0, dtype=torch.bool, device=dev)
        keep = torch.cat([k for _, _, k in self._samples])
        return (torch.cat([c for c, _, _ in self._samples])[keep],
                torch.cat([h for _, h, _ in self._samples])[keep])

    def _view(self):
        if self._synced is not None:
            return self._synced
        state = self.state if self.state is not None else CalibrationState.zeros(
            self.n_bins, device=self.device)
        return state, (self._local_samples() if self.adaptive else None)

    def compute(self):
        """{"ece", "mce", "rmsce", "brier", "nll", "accuracy", "n"} (+ "classwise_ece",
        "adaptive_ece"), float64 tensors; the global ones after sync(). NaN with no sample."""
        state, samples = self._view()
        return report_from_state(state, samples)

    def table(self):
        """The reliability-diagram table of the accumulated (or, after sync(), global) state."""
        return table_from_state(self._view()[0])

    def merge(self, other: "CalibrationMeter") -> "CalibrationMeter":
        """Adds another meter's updates (of the same configuration) to this one's."""
        if not isinstance(other, CalibrationMeter) or (
                other.n_bins, other.classwise, other.adaptive) != (
                self.n_bins, self.classwise, self.adaptive):
            raise ValueError("CalibrationMeter: merge needs a meter with the same n_bins, "
                             "classwise and adaptive")
        if other.state is not None:
            mine = self.state
            theirs = other.state.to(mine.counts.device) if mine is not None else other.state
            self.state = theirs if mine is None else mine + theirs
        dev = self.state.counts.device if self.state is not None else None
        self._samples += [tuple(t.to(dev) for t in s) for s in other._samples]
        self._synced = None
        return self

    def __add__(self, other):
        out = CalibrationMeter(self.n_bins, from_logits=self.from_logits,
                               ignore_index=self.ignore_index, classwise=self.classwise,
                               adaptive=self.adaptive, backend=self.backend, device=self.device)
        return out.merge(self).merge(other)

    def to(self, device):
        """Moves the state (and the AdaECE samples) to device."""
        self.device = torch.device(device)
        if self.state is not None:
            self.state = self.state.to(self.device)
        self._samples = [tuple(t.to(self.device) for t in s) for s in self._samples]
        if self._synced is not None:
            state, samples = self._synced
            self._synced = (state.to(self.device),
                            None if samples is None else tuple(t.to(self.device) for t in samples))
        return self

    def __repr__(self):
        n = "no sample" if self.state is None else f"{int(self.state.n_samples)} samples"
        flags = "".join([", classwise" if self.classwise else "",
                         ", adaptive" if self.adaptive else "",
                         ", synced" if self._synced is not None else ""])
        return (f"CalibrationMeter(n_bins={self.n_bins}, from_logits={self.from_logits}, "
                f"ignore_index={self.ignore_index}{flags}; {n})")

    def state_dict(self):
        d = {"n_bins": self.n_bins}
        if self.state is not None:
            d.update({f.name: getattr(self.state, f.name) for f in fields(self.state)
                      if getattr(self.state, f.name) is not None})
        if self.adaptive:
            d["confidence"], d["correct"] = self._local_samples()
        return d

    def load_state_dict(self, d):
        if d["n_bins"] != self.n_bins:
            raise ValueError(f"CalibrationMeter: state has {d['n_bins']} bins, this meter "
                             f"{self.n_bins}")
        self.reset()
        if "counts" in d:
            self.state = CalibrationState(*(d.get(f.name) for f in fields(CalibrationState)))
            for name in ("brier", "nll"):  # states saved before these existed
                if getattr(self.state, name) is None:
                    setattr(self.state, name, torch.zeros((), dtype=torch.float64,
                                                          device=self.state.counts.device))
        if "confidence" in d:
            keep = torch.ones_like(d["correct"], dtype=torch.bool)
            self._samples = [(d["confidence"], d["correct"], keep)]
        return self

    def sync(self, process_group=None):
        """All-reduce (SUM) this rank's state over a torch.distributed group; afterwards every
        rank's compute() and table() give the global result. A rank that saw no data takes part
        with a zero state; without an initialised process group (or with one rank) it is a
        no-op; after more updates it may be called again, counting nothing twice."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or \
                dist.get_world_size(process_group) == 1:
            return self
        dev = self._comm_device(process_group)
        # Agree on the classwise shape first: a rank without data does not know C.
        c = -1 if self.state is None or self.state.cw_counts is None else \
            self.state.cw_counts.shape[0]
        header = torch.tensor([c], dtype=torch.int64, device=dev)
        dist.all_reduce(header, op=dist.ReduceOp.MAX, group=process_group)
        c = int(header.item())
        local = self.state.to(dev) if self.state is not None else CalibrationState.zeros(
            self.n_bins, c if self.classwise and c >= 0 else None, dev)
        names = [f.name for f in fields(local) if getattr(local, f.name) is not None]
        state = CalibrationState(**{name: getattr(local, name).clone() for name in names})
        for name in names:
            dist.all_reduce(getattr(state, name), op=dist.ReduceOp.SUM, group=process_group)
        samples = None
        if self.adaptive:
            conf, correct = self._local_samples()
            samples = (_all_gather_uneven(conf.to(dev), process_group),
                       _all_gather_uneven(correct.to(dev), process_group))
        self._synced = (state, samples)
        return self

    def _comm_device(self, group):
        import torch.distributed as dist

        if self.state is not None:
            return self.state.counts.device
        if self.device is not None:
            return self.device
        if dist.get_backend(group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _all_gather_uneven(t, group):
    import torch.distributed as dist

    if t.dtype == torch.bool:  # not every backend gathers bool
        return _all_gather_uneven(t.to(torch.uint8), group).bool()
    world = dist.get_world_size(group)
    size = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = max(1, int(max(s.item() for s in sizes)))
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])
