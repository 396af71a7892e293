"""backend="auto" on CUDA follows the newest GPU run committed under bench/results: its
TRITON_FROM_ROW_BYTES thresholds lose least on that run's tables (bench/auto_backend.py)."""

import importlib.util
import math
import os

import pytest

from calibkernels.focal_loss import TRITON_FROM_ROW_BYTES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
_spec = importlib.util.spec_from_file_location("auto_backend",
                                               os.path.join(ROOT, "bench", "auto_backend.py"))
auto_backend = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(auto_backend)


def newest_run(op):
    """The newest results folder (named <date>-<gpu>) with op's table, or None."""
    runs = sorted(d for d in os.listdir(RESULTS)
                  if os.path.exists(os.path.join(RESULTS, d, auto_backend.TABLES[op])))
    return os.path.join(RESULTS, runs[-1]) if runs else None


@pytest.mark.parametrize("op", sorted(auto_backend.TABLES))
def test_auto_backend_follows_the_newest_gpu_run(op):
    run = newest_run(op)
    if run is None:
        pytest.skip(f"no {auto_backend.TABLES[op]} under bench/results")
    pts = auto_backend.read(run, op)
    assert pts, f"{run}: no point where both cuda and triton ran"
    intervals, best = auto_backend.best_thresholds(pts)
    assert auto_backend.within(TRITON_FROM_ROW_BYTES[op], intervals), (
        f"TRITON_FROM_ROW_BYTES[{op!r}] = {TRITON_FROM_ROW_BYTES[op]} is not among the thresholds "
        f"that lose least on {run} ({intervals}, loss {best:.3f}): run "
        f"`python bench/auto_backend.py {run}` and set it from there")


def test_best_thresholds_of_a_run_with_no_single_crossing():
    # Triton wins at 400 B, loses at 2000 B by a little, wins from 4000 B: from 4000 loses 0.25
    # (at 400), from 400 loses 0.1 (at 2000); never Triton loses 0.25 + 1 + 1
    rows = []
    for c, cuda, triton in [(10, 1.0, 2.0), (100, 1.25, 1.0), (500, 1.0, 1.1), (1000, 2.0, 1.0),
                            (32000, 3.0, 1.5)]:
        rows += [dict(n=8, c=c, dtype="float32", impl="cuda", ms=cuda),
                 dict(n=8, c=c, dtype="float32", impl="triton", ms=triton),
                 dict(n=8, c=c, dtype="float32", impl="eager", ms=9.0)]
    pts = auto_backend.points(rows)
    assert len(pts) == 5
    intervals, best = auto_backend.best_thresholds(pts)
    assert intervals == [(40, 400)] and best == pytest.approx(0.1)
    assert auto_backend.within(300, intervals) and not auto_backend.within(4000, intervals)
    assert auto_backend.loss(pts, math.inf) == pytest.approx(0.25 + 1 + 1)
