"""CalibrationMeter.sync across 2 and 4 gloo ranks on this machine, uneven shards and a rank that
sees no data: every rank ends with the single-process result, and a second sync after more
updates counts nothing twice."""

import pytest
import torch

import calibkernels as ck
from helpers import run_gloo_ranks

N = 5000
# uneven contiguous shards; one rank of each world sees no data at all
SHARDS = {2: [0, 0, N], 4: [0, 1300, 1300, 3100, N]}


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 12, generator=g) * 3
    t = torch.randint(0, 12, (N,), generator=g)
    t[::9] = -100
    return x, t


def _halves(lo, hi):
    mid = (lo + hi) // 2
    return (lo, mid), (mid, hi)


def _rank(rank, world):
    x, t = _data()
    shard = SHARDS[world][rank], SHARDS[world][rank + 1]
    meter = ck.CalibrationMeter(classwise=True, adaptive=True)
    results = []
    for lo, hi in _halves(*shard):
        for start in range(lo, hi, 512):
            meter.update(x[start:min(hi, start + 512)], t[start:min(hi, start + 512)])
        results.append(meter.sync().compute())
    results.append(meter.sync().compute())  # twice in a row: still the same
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_gloo_ranks_equal_one_process(tmp_path, world):
    ranks = run_gloo_ranks(_rank, world, tmp_path)
    x, t = _data()
    bounds = SHARDS[world]
    first = torch.cat([torch.arange(*_halves(bounds[r], bounds[r + 1])[0])
                       for r in range(world)])
    expected = []
    for rows in [first, torch.arange(N), torch.arange(N)]:
        single = ck.CalibrationMeter(classwise=True, adaptive=True)
        single.update(x[rows], t[rows])
        expected.append(single.compute())
    for rank in range(world):
        for step, (metrics, want) in enumerate(zip(ranks[rank], expected)):
            assert metrics["n"] == want["n"], (rank, step)
            for name, value in want.items():
                # float64 sums in another order: within rounding; AdaECE gathers every sample
                torch.testing.assert_close(metrics[name], value, rtol=1e-12, atol=1e-12,
                                           msg=f"rank {rank}, sync {step}, {name}")
            assert torch.equal(metrics["adaptive_ece"], want["adaptive_ece"])
