"""calibkernels' binned calibration error as a torchmetrics Metric (needs torchmetrics).

Its states are the O(n_bins) per-bin sums with dist_reduce_fx="sum", so a DDP sync moves
3 x n_bins numbers, where torchmetrics' own MulticlassCalibrationError gathers every prediction.
"""

import torch
from torchmetrics import Metric

from .calibration import NORMS, binned_error, bin_boundaries
from . import ops


class BinnedCalibrationError(Metric):
    """Top-label calibration error (norm "l1" = ECE, "max" = MCE, "l2" = RMSCE) from logits
    (from_logits=True) or probabilities, with the fused calibration_bins kernel."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, n_bins=15, norm="l1", from_logits=True, ignore_index=-100, **kwargs):
        super().__init__(**kwargs)
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be an int >= 1, got {n_bins!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.n_bins, self.norm = n_bins, norm
        self.from_logits, self.ignore_index = from_logits, ignore_index
        self.add_state("counts", torch.zeros(n_bins, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("conf_sums", torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hits", torch.zeros(n_bins, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        out = ops.calibration_bins(preds, target, bin_boundaries(self.n_bins, preds.device),
                                   self.from_logits, int(self.ignore_index), False, False)
        self.counts += out[0]
        self.conf_sums += out[1]
        self.hits += out[2]

    def compute(self) -> torch.Tensor:
        return binned_error(self.counts, self.conf_sums, self.hits, self.norm)
