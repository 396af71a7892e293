"""Gamma for focal loss: a fixed float or an adaptive per-sample schedule (FLSD, CONTRACT §1)."""

import math
from dataclasses import dataclass

import torch

MAX_PIECES = 8


@dataclass(frozen=True)
class GammaSchedule:
    """gamma_i = gammas[j] for the first j with p_i,y < thresholds[j], else `default`.

    Thresholds are strictly increasing in (0, 1]; a fixed gamma is a schedule with no pieces.
    """

    thresholds: tuple = ()
    gammas: tuple = ()
    default: float = 3.0

    def __post_init__(self):
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        object.__setattr__(self, "gammas", tuple(float(g) for g in self.gammas))
        object.__setattr__(self, "default", float(self.default))
        if len(self.thresholds) != len(self.gammas):
            raise ValueError(f"GammaSchedule needs one gamma per threshold, got "
                             f"{len(self.thresholds)} thresholds and {len(self.gammas)} gammas")
        if len(self.thresholds) > MAX_PIECES:
            raise ValueError(f"GammaSchedule has at most {MAX_PIECES} thresholds, "
                             f"got {len(self.thresholds)}")
        for t in self.thresholds:
            if not 0.0 < t <= 1.0:
                raise ValueError(f"GammaSchedule thresholds must lie in (0, 1], got {t}")
        if any(b <= a for a, b in zip(self.thresholds, self.thresholds[1:])):
            raise ValueError(f"GammaSchedule thresholds must be strictly increasing, "
                             f"got {list(self.thresholds)}")
        for g in self.gammas + (self.default,):
            if not (math.isfinite(g) and g >= 0.0):
                raise ValueError(f"gamma must be a finite number >= 0, got {g}")

    @property
    def is_fixed(self) -> bool:
        return not self.thresholds

    def gamma_per_sample(self, p_y: torch.Tensor) -> torch.Tensor:
        """The gamma of each sample, from its true-class probability (no gradient flows)."""
        p_y = p_y.detach()
        gamma = torch.full_like(p_y, self.default)
        # Walk the pieces backwards so that the first threshold above p_y wins.
        for tau, g in reversed(list(zip(self.thresholds, self.gammas))):
            gamma = torch.where(p_y < tau, torch.full_like(p_y, g), gamma)
        return gamma


# The paper's schedules (Mukhoti et al. 2020): FLSD-53 and FLSD-532.
NAMED_SCHEDULES = {
    "flsd-53": GammaSchedule(thresholds=(0.2,), gammas=(5.0,), default=3.0),
    "flsd-532": GammaSchedule(thresholds=(0.2, 0.5), gammas=(5.0, 3.0), default=2.0),
}


def as_schedule(gamma) -> GammaSchedule:
    """A float, one of NAMED_SCHEDULES' names, or a GammaSchedule, as a GammaSchedule."""
    if isinstance(gamma, GammaSchedule):
        return gamma
    if isinstance(gamma, str):
        try:
            return NAMED_SCHEDULES[gamma.lower()]
        except KeyError:
            raise ValueError(f"unknown gamma schedule {gamma!r}; expected a float, a "
                             f"GammaSchedule or one of {sorted(NAMED_SCHEDULES)}") from None
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise ValueError(f"gamma must be a float, a GammaSchedule or one of "
                         f"{sorted(NAMED_SCHEDULES)}, got {gamma!r}")
    return GammaSchedule(default=float(gamma))
