"""calibkernels: fused focal-loss and calibration kernels for PyTorch."""

from . import ops, reference
from .focal_loss import FocalLoss, focal_loss
from .schedule import NAMED_SCHEDULES, GammaSchedule

__all__ = ["FocalLoss", "GammaSchedule", "NAMED_SCHEDULES", "focal_loss", "ops", "reference"]
__version__ = "0.1.0"
