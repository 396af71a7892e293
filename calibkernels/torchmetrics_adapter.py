"""calibkernels' binned calibration metrics as torchmetrics Metrics (needs torchmetrics:
pip install 'calibkernels[torchmetrics]').

The states are the fused kernel's O(n_bins) per-bin sums with dist_reduce_fx="sum", so a DDP
sync moves a few numbers where torchmetrics' own MulticlassCalibrationError gathers every
prediction (AdaptiveCalibrationError gathers 5 bytes a sample, as AdaECE needs them all).
Inputs are logits or probabilities (from_logits=None decides from the values, as torchmetrics
does) of shape (N, C) or (N, C, d1, ..., dk), class dimension 1.
"""

import torch

from ._optional import require
from .calibration import (NORMS, CalibrationState, _bins, _mode, adaptive_ece_from_samples,
                          as_n_bins, as_rows, binned_error, classwise_ece_from_state,
                          table_from_state)

Metric = require("torchmetrics", "torchmetrics", "calibkernels.torchmetrics_adapter").Metric


class _BinnedCalibration(Metric):
    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    _classwise = False
    _adaptive = False

    def __init__(self, n_bins=15, from_logits=None, ignore_index=-100, num_classes=None,
                 backend="auto", **kwargs):
        super().__init__(**kwargs)
        self.n_bins = as_n_bins(n_bins, type(self).__name__)
        _mode(from_logits, type(self).__name__)
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
            raise ValueError(f"{type(self).__name__}: num_classes must be an int >= 1, "
                             f"got {num_classes!r}")
        if self._classwise and num_classes is None:
            raise ValueError(f"{type(self).__name__} needs num_classes (its state is "
                             f"num_classes x n_bins, allocated before the first update)")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.from_logits, self.ignore_index, self.backend = from_logits, ignore_index, backend
        n = self.n_bins
        self.add_state("counts", torch.zeros(n, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("conf_sums", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hits", torch.zeros(n, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("brier", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("nll", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        if self._classwise:
            shape = (self.num_classes, n)
            self.add_state("cw_counts", torch.zeros(shape, dtype=torch.int64), dist_reduce_fx="sum")
            self.add_state("cw_conf_sums", torch.zeros(shape, dtype=torch.float64),
                           dist_reduce_fx="sum")
            self.add_state("cw_hits", torch.zeros(shape, dtype=torch.int64), dist_reduce_fx="sum")
        if self._adaptive:
            self.add_state("confidence", [], dist_reduce_fx="cat")
            self.add_state("correct", [], dist_reduce_fx="cat")
            self.add_state("kept", [], dist_reduce_fx="cat")  # filtered at compute(): no sync

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        rows, target = as_rows(preds, target, type(self).__name__)
        if self.num_classes is not None and rows.shape[1] != self.num_classes:
            raise ValueError(f"{type(self).__name__}: num_classes={self.num_classes}, but the "
                             f"input has {rows.shape[1]} classes")
        s, conf, correct = _bins(rows, target, self.n_bins, self.from_logits, self.ignore_index,
                                 self._classwise, self._adaptive, self.backend)
        self.counts += s.counts
        self.conf_sums += s.conf_sums
        self.hits += s.hits
        self.brier += s.brier
        self.nll += s.nll
        if self._classwise:
            self.cw_counts += s.cw_counts
            self.cw_conf_sums += s.cw_conf_sums
            self.cw_hits += s.cw_hits
        if self._adaptive:
            self.confidence.append(conf)
            self.correct.append(correct)
            self.kept.append(target != self.ignore_index)

    def _state(self):
        cw = (self.cw_counts, self.cw_conf_sums, self.cw_hits) if self._classwise else (None,) * 3
        return CalibrationState(self.counts, self.conf_sums, self.hits, *cw, self.brier, self.nll)

    def _samples(self):
        def cat(state):  # a list before a sync, one tensor after (dist_reduce_fx="cat")
            return torch.cat(state) if isinstance(state, list) else state

        if isinstance(self.confidence, list) and not self.confidence:
            return torch.empty(0), torch.empty(0, dtype=torch.bool)
        kept = cat(self.kept)
        return cat(self.confidence)[kept], cat(self.correct)[kept]

    def plot(self, val=None, ax=None):
        """The reliability diagram of the accumulated state: (figure, axes), as torchmetrics'
        plot() returns them (drawn on ax when given, else on a new Figure of its own)."""
        from .plotting import reliability_diagram

        fig = reliability_diagram(table=table_from_state(self._state()), ax=ax,
                                  title=type(self).__name__)
        return fig, (ax if ax is not None else fig.axes[0])


class BinnedCalibrationError(_BinnedCalibration):
    """Top-label calibration error (norm "l1" = ECE, "max" = MCE, "l2" = RMSCE) with the fused
    calibration_bins kernel; num_classes is accepted (and checked) as torchmetrics takes it."""

    def __init__(self, n_bins=15, norm="l1", from_logits=None, ignore_index=-100,
                 num_classes=None, **kwargs):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        super().__init__(n_bins, from_logits, ignore_index, num_classes, **kwargs)
        self.norm = norm

    def compute(self) -> torch.Tensor:
        return binned_error(self.counts, self.conf_sums, self.hits, self.norm)


class ClasswiseCalibrationError(_BinnedCalibration):
    """The paper's classwise ECE (the mean over num_classes classes of each class's ECE)."""

    _classwise = True

    def compute(self) -> torch.Tensor:
        return classwise_ece_from_state(self.cw_counts, self.cw_conf_sums, self.cw_hits)


class AdaptiveCalibrationError(_BinnedCalibration):
    """AdaECE over the paper's equal-mass groups (every sample counted); exact across ranks."""

    _adaptive = True

    def compute(self) -> torch.Tensor:
        return adaptive_ece_from_samples(*self._samples(), self.n_bins)
