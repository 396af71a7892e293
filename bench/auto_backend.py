"""backend="auto" on CUDA from a GPU run's tables: the row length (C·bytes) from which the Triton
kernels beat the CUDA C++ ones.

    python bench/auto_backend.py bench/results/<date>-<gpu>

Every point of the run where both backends were timed as called (focal loss forward + backward
from focal_loss.json, by n, c, dtype and gamma; ECE from ece.json) votes. A threshold T sends
rows of C·bytes >= T to Triton; its loss is the sum over the points of the chosen backend's time
over the faster one's, less 1. Printed for each op: every point's winner, the thresholds that lose
least (a union of intervals (lo, hi]), and whether calibkernels' TRITON_FROM_ROW_BYTES lies in
them. tests/test_auto_backend.py holds the constants to the newest run in bench/results.
"""

import argparse
import json
import math
import os
from collections import defaultdict

BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}
TABLES = {"focal_loss": "focal_loss.json", "calibration": "ece.json"}


def points(rows):
    """{(n, c, dtype, gamma): {"cuda": ms, "triton": ms}} of the points where both ran."""
    by = defaultdict(dict)
    for r in rows:
        if r["impl"] in ("cuda", "triton"):
            by[(r["n"], r["c"], r["dtype"], r.get("gamma"))][r["impl"]] = r["ms"]
    return {k: v for k, v in by.items() if len(v) == 2}


def row_bytes(key):
    return key[1] * BYTES[key[2]]


def loss(pts, threshold):
    """Sum over the points of (time of the backend the threshold picks) / (the faster's) - 1."""
    return sum((v["triton"] if row_bytes(k) >= threshold else v["cuda"]) / min(v.values()) - 1
               for k, v in pts.items())


def best_thresholds(pts):
    """(intervals, loss): the thresholds T in any (lo, hi] of intervals lose least (hi may be
    inf: never Triton). Between two measured row lengths every T picks the same backends."""
    sizes = sorted({row_bytes(k) for k in pts})
    candidates = list(zip([0] + sizes, sizes + [math.inf]))  # T in (lo, hi] acts as T = hi
    losses = [loss(pts, hi) for _, hi in candidates]
    best = min(losses)
    return [c for c, l in zip(candidates, losses) if l <= best + 1e-12], best


def within(value, intervals):
    return any(lo < value <= hi for lo, hi in intervals)


def read(results_dir, op):
    """The points of op ("focal_loss" or "calibration") in a results folder ({} if none)."""
    path = os.path.join(results_dir, TABLES[op])
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return points(json.load(f)["rows"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a bench/results/<date>-<gpu> folder")
    args = ap.parse_args()
    from calibkernels.focal_loss import TRITON_FROM_ROW_BYTES
    for op in TABLES:
        pts = read(args.results, op)
        if not pts:
            print(f"{op}: no point with both backends in {TABLES[op]}")
            continue
        print(f"{op} ({TABLES[op]}):")
        for k in sorted(pts, key=lambda k: (row_bytes(k), str(k))):
            v = pts[k]
            winner = "triton" if v["triton"] < v["cuda"] else "cuda"
            print(f"  {k[0]}x{k[1]} {k[2]} gamma={k[3]}: {row_bytes(k)} B a row, "
                  f"cuda {v['cuda']:.3f} ms, triton {v['triton']:.3f} ms -> {winner}")
        intervals, best = best_thresholds(pts)
        ranges = ", ".join(f"({lo}, {hi}]" for lo, hi in intervals)
        now = TRITON_FROM_ROW_BYTES[op]
        print(f"  least loss {best:.3f} for a threshold in {ranges}; "
              f"TRITON_FROM_ROW_BYTES[{op!r}] = {now}: "
              f"{'within' if within(now, intervals) else 'OUTSIDE, change it'}")


if __name__ == "__main__":
    main()
