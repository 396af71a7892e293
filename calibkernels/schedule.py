"""Gamma for focal loss: a fixed float or an adaptive per-sample schedule (FLSD, CONTRACT §1).

The ops take gamma as a float64 table [thresholds..., gammas..., default] (a fixed gamma is a
table of one value), so that a new gamma or schedule is a new tensor value, never a new compiled
graph: under torch.compile(fullgraph=True) changing gamma causes neither a graph break nor a
recompile per value.
"""

import functools
import math
import numbers
from dataclasses import dataclass, field

import torch

MAX_PIECES = 8


def _check_gamma(g):
    if not (math.isfinite(g) and g >= 0.0):
        raise ValueError(f"gamma must be a finite number >= 0, got {g}")


@dataclass(frozen=True)
class GammaSchedule:
    """gamma_i = gammas[j] for the first j with p_i,y < thresholds[j], else `default`.

    Thresholds are strictly increasing in (0, 1]; a fixed gamma is a schedule with no pieces.
    """

    thresholds: tuple = ()
    gammas: tuple = ()
    default: float = 3.0
    table: torch.Tensor = field(init=False, repr=False, compare=False)

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
            _check_gamma(g)
        table = torch.tensor(self.thresholds + self.gammas + (self.default,), dtype=torch.float64)
        object.__setattr__(self, "table", table)

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
    """A float (or NumPy scalar, or 0-d tensor), one of NAMED_SCHEDULES' names, or a
    GammaSchedule, as a GammaSchedule (for the eager reference and repr)."""
    if isinstance(gamma, GammaSchedule):
        return gamma
    if isinstance(gamma, str):
        try:
            return NAMED_SCHEDULES[gamma.lower()]
        except KeyError:
            raise ValueError(f"unknown gamma schedule {gamma!r}; expected a float, a "
                             f"GammaSchedule or one of {sorted(NAMED_SCHEDULES)}") from None
    return GammaSchedule(default=_as_float(gamma))


def _as_float(gamma) -> float:
    if isinstance(gamma, torch.Tensor):
        if gamma.numel() != 1 or gamma.dtype == torch.bool or gamma.is_complex():
            raise ValueError(f"gamma as a tensor must hold one real number, got "
                             f"{gamma.dtype} of shape {tuple(gamma.shape)}")
        return float(gamma)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise ValueError(f"gamma must be a float, a GammaSchedule or one of "
                         f"{sorted(NAMED_SCHEDULES)}, got {gamma!r}")
    return float(gamma)


@functools.lru_cache(maxsize=64)
def _fixed_table(g: float) -> torch.Tensor:
    _check_gamma(g)
    return torch.tensor([g], dtype=torch.float64)


def gamma_table(gamma) -> torch.Tensor:
    """The ops' gamma argument: a float64 table (see the module docstring). A 0-d tensor keeps
    its device (a CUDA gamma is read by the kernels on the device: no host synchronisation)."""
    if type(gamma) is float and not torch.compiler.is_compiling():
        return _fixed_table(gamma)  # the common case first: a cache hit
    if isinstance(gamma, GammaSchedule):
        return gamma.table
    if isinstance(gamma, str):
        return as_schedule(gamma).table
    if isinstance(gamma, torch.Tensor):
        if gamma.numel() != 1 or gamma.dtype == torch.bool or gamma.is_complex():
            raise ValueError(f"gamma as a tensor must hold one real number, got "
                             f"{gamma.dtype} of shape {tuple(gamma.shape)}")
        table = gamma.detach().reshape(1).to(torch.float64)
        if table.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_gamma(float(table))
        return table
    if torch.compiler.is_compiling():
        # A symbolic float: the table is built in the graph (a float64 add), so that a new value
        # is a new input, not a new graph. The op checks the value when it runs.
        return torch.zeros(1, dtype=torch.float64) + gamma
    return _fixed_table(_as_float(gamma))
