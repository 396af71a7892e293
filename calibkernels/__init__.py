"""calibkernels: fused focal-loss and calibration kernels for PyTorch."""

from . import ops, reference
from ._version import __version__
from .calibration import (CalibrationMeter, CalibrationState, adaptive_ece, calibration_bins,
                          calibration_error, calibration_report, calibration_sweep,
                          classwise_ece, ece, mce, reliability_table, rmsce)
from .focal_loss import FocalLoss, focal_loss
from .linear_focal_loss import LinearFocalLoss, linear_focal_loss
from .ops import cpu_capability
from .plotting import reliability_diagram
from .schedule import NAMED_SCHEDULES, GammaSchedule
from .temperature import fit_temperature
from .vocab_parallel import vocab_parallel_focal_loss

__all__ = ["__version__", "CalibrationMeter", "CalibrationState", "FocalLoss", "GammaSchedule",
           "LinearFocalLoss", "NAMED_SCHEDULES", "adaptive_ece", "calibration_bins",
           "calibration_error", "calibration_report", "calibration_sweep", "classwise_ece",
           "cpu_capability", "ece", "fit_temperature", "focal_loss", "linear_focal_loss", "mce",
           "ops", "reference", "reliability_diagram", "reliability_table", "rmsce",
           "vocab_parallel_focal_loss"]
