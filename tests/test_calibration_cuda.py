"""Calibration kernels on a GPU, both backends (CUDA C++ and Triton); marked `cuda`."""

import pytest
import torch

import calibkernels as ck
from calibkernels import reference
from test_calibration import _data

pytestmark = pytest.mark.cuda

BACKENDS = ["cuda", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("n,c", [(5000, 1), (5000, 3), (20000, 10), (4096, 1000), (256, 32000),
                                 (64, 262144)])
def test_gpu_matches_cpu(backend, dtype, from_logits, n, c):
    x, t = _data(n, c, dtype=torch.float64, seed=c, ignore=True)
    inp = (x if from_logits else x.softmax(1)).to(dtype)
    classwise = c <= 1000
    gpu = ck.calibration_bins(inp.cuda(), t.cuda(), 15, from_logits=from_logits,
                              classwise=classwise, backend=backend)
    cpu = ck.calibration_bins(inp, t, 15, from_logits=from_logits, classwise=classwise)
    names = ["counts", "hits"] + (["cw_counts", "cw_hits"] if classwise else [])
    for name in names:
        a, b = getattr(gpu, name).cpu(), getattr(cpu, name)
        if from_logits:  # exp differs by an ulp between devices: a sample on an edge may move
            assert (a - b).abs().sum() <= max(2, n // 1000), name
        else:
            assert torch.equal(a, b), name
    for norm in ["l1", "max", "l2"]:
        torch.testing.assert_close(
            ck.calibration_error(inp.cuda(), t.cuda(), 15, norm, from_logits,
                                 backend=backend).cpu(),
            reference.calibration_error(inp, t, 15, norm, from_logits), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_bitwise_deterministic(backend):
    x, t = _data(50000, 100, dtype=torch.float32, seed=1)
    x, t = x.cuda(), t.cuda()
    first = ck.calibration_bins(x, t, 15, classwise=True, backend=backend)
    for _ in range(10):
        again = ck.calibration_bins(x, t, 15, classwise=True, backend=backend)
        for name in ["counts", "conf_sums", "hits", "cw_counts", "cw_conf_sums", "cw_hits"]:
            assert torch.equal(getattr(first, name), getattr(again, name)), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_poisons_bad_samples(backend):
    x = torch.randn(6, 4, device="cuda")
    t = torch.tensor([0, 1, 9, 2, 3, 0], device="cuda")
    assert torch.isnan(ck.ece(x, t, backend=backend))
    p = x.softmax(1)
    p[4, 1] = 1.5
    t[2] = 1
    assert torch.isnan(ck.ece(p, t, from_logits=False, backend=backend))


@pytest.mark.parametrize("op", ["calibration_bins", "calibration_bins_triton"])
def test_gpu_opcheck(op):
    x, t = _data(300, 7, dtype=torch.float32, seed=2, ignore=True)
    beta = torch.linspace(0, 1, 16, device="cuda")
    if op.endswith("triton"):
        ck.ops.load_triton()
    for classwise in [False, True]:
        for inp, mode in [(x, 1), (x.softmax(1), 0), (x, -1), (x.softmax(1), -1)]:
            torch.library.opcheck(getattr(torch.ops.calibkernels, op).default,
                                  (inp.cuda(), t.cuda(), beta, mode, -100, classwise, True))


def test_gpu_meter_sync_nccl_single_rank(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        x, t = _data(3000, 10, dtype=torch.float32, seed=3)
        meter = ck.CalibrationMeter(classwise=True, adaptive=True)
        meter.update(x.cuda(), t.cuda())
        before = meter.compute()
        after = meter.sync().compute()
        for k, v in before.items():
            torch.testing.assert_close(after[k], v)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_update_adds_no_host_sync(backend):
    # the logits-or-probabilities rule is decided on the device; AdaECE's samples kept as they are
    x, t = _data(4096, 100, dtype=torch.float32, seed=4, ignore=True)
    x, t = x.cuda(), t.cuda()
    meter = ck.CalibrationMeter(classwise=True, adaptive=True, backend=backend)
    meter.update(x, t)  # warm-up: Triton compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        meter.update(x, t).update(x.softmax(1), t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = ck.CalibrationMeter(classwise=True, adaptive=True)
    cpu.update(x.cpu(), t.cpu()).update(x.cpu(), t.cpu()).update(x.softmax(1).cpu(), t.cpu())
    for k, v in cpu.compute().items():
        torch.testing.assert_close(meter.compute()[k].cpu(), v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_report_and_sweep_match_cpu(backend, dtype):
    x, t = _data(20000, 100, dtype=torch.float64, seed=5, ignore=True)
    x = x.to(dtype)
    for inp in [x, x.float().softmax(1).to(dtype)]:
        gpu = ck.calibration_report(inp.cuda(), t.cuda(), backend=backend)
        cpu = ck.calibration_report(inp, t)
        for k, v in cpu.items():
            torch.testing.assert_close(gpu[k].cpu(), v, rtol=1e-4, atol=1e-5, msg=k)
    temps = [i / 10 for i in range(1, 101)]
    gpu = ck.calibration_sweep(x.cuda(), t.cuda(), temps, backend=backend)
    cpu = ck.calibration_sweep(x, t, temps)
    torch.testing.assert_close(gpu["nll"].cpu(), cpu["nll"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu["ece"].cpu(), cpu["ece"], rtol=1e-3, atol=1e-4)
