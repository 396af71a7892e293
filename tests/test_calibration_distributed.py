"""CalibrationMeter.sync across 2 and 4 gloo ranks on this machine, uneven shards and a rank that
sees no data: every rank ends with the single-process result, and a second sync after more
updates counts nothing twice."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import calibkernels as ck

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


def _rank(rank, world, store_path, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world)
    try:
        x, t = _data()
        shard = SHARDS[world][rank], SHARDS[world][rank + 1]
        meter = ck.CalibrationMeter(classwise=True, adaptive=True)
        results = []
        for lo, hi in _halves(*shard):
            for start in range(lo, hi, 512):
                meter.update(x[start:min(hi, start + 512)], t[start:min(hi, start + 512)])
            results.append(meter.sync().compute())
        results.append(meter.sync().compute())  # twice in a row: still the same
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_gloo_ranks_equal_one_process(tmp_path, world):
    mp.spawn(_rank, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
             join=True)
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
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for step, (metrics, want) in enumerate(zip(got, expected)):
            assert metrics["n"] == want["n"], (rank, step)
            for name, value in want.items():
                # float64 sums in another order: within rounding; AdaECE gathers every sample
                torch.testing.assert_close(metrics[name], value, rtol=1e-12, atol=1e-12,
                                           msg=f"rank {rank}, sync {step}, {name}")
            assert torch.equal(metrics["adaptive_ece"], want["adaptive_ece"])
