"""calibkernels: fused focal-loss and calibration kernels for PyTorch."""

from . import ops, reference
from .calibration import (CalibrationMeter, CalibrationState, adaptive_ece, calibration_bins,
                          calibration_error, calibration_report, calibration_sweep,
                          classwise_ece, ece, mce, reliability_table, rmsce)
from .focal_loss import FocalLoss, focal_loss
from .plotting import reliability_diagram
from .schedule import NAMED_SCHEDULES, GammaSchedule
from .temperature import fit_temperature

__all__ = ["CalibrationMeter", "CalibrationState", "FocalLoss", "GammaSchedule",
           "NAMED_SCHEDULES", "adaptive_ece", "calibration_bins", "calibration_error",
           "calibration_report", "calibration_sweep", "classwise_ece", "ece", "fit_temperature",
           "focal_loss", "mce", "ops", "reference", "reliability_diagram", "reliability_table",
           "rmsce"]
__version__ = "0.1.0"
