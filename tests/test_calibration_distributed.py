"""CalibrationMeter.sync across 4 gloo ranks on this machine, uneven shards: every rank ends with
the single-process result."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import calibkernels as ck

WORLD = 4
SHARDS = [0, 1300, 1400, 3100, 5000]  # uneven contiguous shards of 5000 samples


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 12, generator=g) * 3
    t = torch.randint(0, 12, (5000,), generator=g)
    t[::9] = -100
    return x, t


def _rank(rank, store_path, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=WORLD)
    try:
        x, t = _data()
        lo, hi = SHARDS[rank], SHARDS[rank + 1]
        meter = ck.CalibrationMeter(classwise=True, adaptive=True)
        for start in range(lo, hi, 512):
            meter.update(x[start:min(hi, start + 512)], t[start:min(hi, start + 512)])
        meter.sync()
        torch.save({"metrics": meter.compute(), "state": meter.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_four_gloo_ranks_equal_one_process(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    x, t = _data()
    single = ck.CalibrationMeter(classwise=True, adaptive=True)
    single.update(x, t)
    expected, expected_state = single.compute(), single.state_dict()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name in ["counts", "hits", "cw_counts", "cw_hits"]:  # integers: exactly
            assert torch.equal(got["state"][name], expected_state[name])
        for name in ["conf_sums", "cw_conf_sums"]:  # float64 sums in another order
            torch.testing.assert_close(got["state"][name], expected_state[name], rtol=1e-12,
                                       atol=1e-12)
        for name, value in expected.items():
            torch.testing.assert_close(got["metrics"][name], value, rtol=1e-12, atol=1e-12)
        assert torch.equal(got["metrics"]["adaptive_ece"], expected["adaptive_ece"])
