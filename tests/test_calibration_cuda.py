"""Calibration kernels on a GPU, both backends (CUDA C++ and Triton); marked `cuda`."""

import pytest
import torch

import calibkernels as ck
from calibkernels import reference
from calibkernels.calibration import per_sample
from test_calibration import (_data, assert_inf_target_logit_poisons_every_metric,
                              ignored_rows_case, poisoned_logits, raw_per_sample, sweep_hits)

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


@pytest.mark.parametrize("n_bins", [96, 97, 300, 2000])
def test_gpu_classwise_takes_any_n_bins(n_bins):
    # up to 96 bins a thread's bins sit in shared memory, beyond in its slice of the partials
    # (the state itself when there is one chunk: 500 rows); 2000 bins on rows of 128 KiB: "auto"
    # leaves Triton (1024 bins at most) for the CUDA C++ kernel
    long_rows = [(40, 32768, "auto")] if n_bins > 1024 else []
    for n, c, backend in [(3000, 100, "cuda"), (500, 100, "cuda")] + long_rows:
        x, t = _data(n, c, dtype=torch.float32, seed=n_bins, ignore=True)
        p = x.double().softmax(1).float()  # probabilities: bins identical on both devices
        gpu = ck.calibration_bins(p.cuda(), t.cuda(), n_bins, from_logits=False, classwise=True,
                                  backend=backend)
        cpu = ck.calibration_bins(p, t, n_bins, from_logits=False, classwise=True)
        for name in ["counts", "hits", "cw_counts", "cw_hits"]:
            assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), (name, c)
        for name in ["conf_sums", "cw_conf_sums"]:
            torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), rtol=1e-12,
                                       atol=1e-12)
    with pytest.raises(ValueError, match="n_bins <= 1024"):
        ck.ece(p.cuda(), t.cuda(), 1025, backend="triton")


def test_gpu_classwise_takes_millions_of_classes():
    # a class a thread, 128 threads a block: beyond 65535 * 128 classes the blocks stride over
    # the classes (the grid's y extent stops at 65535)
    c = 65535 * 128 + 1000
    g = torch.Generator().manual_seed(3)
    p = torch.rand(3, c, generator=g) / c
    t = torch.tensor([5, c - 1, -100])
    p[0, 5], p[1, c - 2], p[1, 7] = 0.9, 0.6, 0.3  # a hit, a miss and the bins past 0
    gpu = ck.calibration_bins(p.cuda(), t.cuda(), 2, from_logits=False, classwise=True,
                              backend="cuda")
    cpu = ck.calibration_bins(p, t, 2, from_logits=False, classwise=True)
    for name in ["cw_counts", "cw_hits"]:
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name
    torch.testing.assert_close(gpu.cw_conf_sums.cpu(), cpu.cw_conf_sums, rtol=1e-12, atol=1e-12)
    assert gpu.cw_counts[c - 1000:].sum().item() == 2 * 1000  # the last blocks' classes counted


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_never_counts_a_nan_confidence_correct(backend, dtype):
    # fmaxf and a GPU's tl.max drop a NaN that torch.argmax would name: the rule is the CPU's
    for c in [2, 5, 40, 100, 1000, 5000, 40000]:  # every row layout, registers and streamed
        x, t, expected = poisoned_logits(c, dtype)
        conf, correct = per_sample(x.cuda(), t.cuda(), backend=backend)
        assert torch.equal(correct.cpu(), expected), c
        assert torch.equal(conf.isnan().cpu(), per_sample(x, t)[0].isnan()), c
        s = ck.calibration_bins(x.cuda(), t.cuda(), backend=backend)
        assert s.hits.sum().item() == expected.sum().item(), c
        hits = sweep_hits(x.cuda(), t.cuda(), "triton" if backend == "triton" else "cuda")
        assert torch.equal(hits, expected.sum().repeat(3)), c
        report = ck.calibration_report(x.cuda(), t.cuda(), backend=backend)
        assert all(v.isnan() for k, v in report.items() if k != "n"), (c, report)
    # a value outside [0, 1] poisons a forced probability reading (the CPU raises): never correct;
    # decided on the device (None) it makes the batch logits, and the sample counts as usual
    for mode in [False, None]:
        x, t = _data(40, 7, dtype=torch.float32, seed=9)
        p = x.softmax(1).to(dtype)
        p[3, t[3]] = 1.5  # the argmax, at the target
        conf, correct = per_sample(p.cuda(), t.cuda(), from_logits=mode, backend=backend)
        if mode is False:
            assert conf[3].isnan() and not correct[3]
        expected = (p.float().argmax(1) == t) & ~conf.isnan().cpu()
        assert torch.equal(correct.cpu(), expected), mode
        s = ck.calibration_bins(p.cuda(), t.cuda(), from_logits=mode, backend=backend)
        assert s.hits.sum().item() == expected.sum().item(), mode


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_inf_target_logit_poisons_every_metric(backend):
    assert_inf_target_logit_poisons_every_metric("cuda", backend)


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
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_gpu_per_sample_of_every_row_matches_cpu(backend, ignore_index):
    # the op's raw per-sample outputs, ignored rows included (0 and not correct on every backend)
    x, p, t = ignored_rows_case(ignore_index)
    for inp, mode in [(x, 1), (p, 0), (p, -1)]:
        conf, correct = raw_per_sample(inp.cuda(), t.cuda(), mode, backend, ignore_index)
        cpu_conf, cpu_correct = raw_per_sample(inp, t, mode, ignore_index=ignore_index)
        torch.testing.assert_close(conf, cpu_conf, rtol=1e-6, atol=1e-7, msg=str(mode))
        assert torch.equal(correct, cpu_correct), mode


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
    t[7] = 100  # out of range: the CPU raises, the GPU gives NaN (never column 0's NLL)
    bad = ck.calibration_sweep(x.cuda(), t.cuda(), temps[:3], backend=backend)
    assert bad["nll"].isnan().all() and bad["ece"].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 40, 256])
def test_gpu_sweep_keeps_a_nan_seen_before_the_first_finite_logit(backend, k):
    # the row's first 300 classes (more than a CUDA chunk, than a Triton block) are a NaN and
    # -inf: the NaN is summed while the max is -inf and must survive the rescaling
    x, t = _data(16, 1000, dtype=torch.float32, seed=k)
    x[5, 0], x[5, 1:300], t[5] = float("nan"), float("-inf"), 600
    temps = torch.linspace(0.1, 10.0, k, dtype=torch.float64)
    out = ck.calibration_sweep(x.cuda(), t.cuda(), temps, backend=backend)
    assert out["nll"].isnan().all() and out["ece"].isnan().all()
    x[5, 0] = float("-inf")  # without the NaN: finite, and the CPU's
    out = ck.calibration_sweep(x.cuda(), t.cuda(), temps, backend=backend)
    cpu = ck.calibration_sweep(x, t, temps)
    torch.testing.assert_close(out["nll"].cpu(), cpu["nll"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3, 32, 33, 100, 256])
@pytest.mark.parametrize("c", [1, 2, 255, 256, 257, 1000, 32000])
def test_gpu_sweep_every_lane_split_matches_cpu(backend, k, c):
    # The CUDA sweep splits a warp's lanes into groups of elements by lanes of temperatures (1-32
    # temperature lanes, 1-8 sums a lane) and reads the row once in chunks of 256, online in the
    # max: every split, rows ending on either side of a chunk, a max in a later chunk than the
    # first (rescaled sums), confident rows and -inf entries.
    n = max(8, 2 ** 17 // c)
    x, t = _data(n, c, dtype=torch.float64, seed=c + k, ignore=True)
    if c > 256:
        x[1, -1] = 50.0  # the max in the last chunk: every earlier sum is rescaled
        x[2, : c // 2] = float("-inf")
        t[2] = c - 2  # a finite target logit: a finite NLL
    x[3, t[3] if t[3] >= 0 else 0] += 30.0  # confident: p_y -> 1
    temps = torch.linspace(0.05, 10.0, k, dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        xd = x.to(dtype)
        gpu = ck.calibration_sweep(xd.cuda(), t.cuda(), temps, backend=backend)
        cpu = ck.calibration_sweep(xd, t, temps)
        msg = f"{dtype} K={k} C={c}"
        tol = (dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64  # CONTRACT §4
               else dict(rtol=1e-5, atol=1e-6))
        torch.testing.assert_close(gpu["nll"].cpu(), cpu["nll"], **tol, msg=msg)
        if dtype != torch.float64:  # an ulp of exp may move a sample across a bin's edge
            tol = dict(rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(gpu["ece"].cpu(), cpu["ece"], **tol, msg=msg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_bins", [1, 20, 21, 100])
@pytest.mark.parametrize("n,k", [(0, 3), (1, 1), (511, 33), (5000, 65)])
def test_gpu_sweep_bins_of_every_chunk_match_cpu(backend, n_bins, n, k):
    # The CUDA sweep's binning: a block per chunk of 2048 rows, 32 temperatures and a tile of at
    # most 20 bins, its four warps a quarter of the rows each: empty batches, chunks and quarters
    # that end early, temperature blocks that end early and several bin tiles, in float64 (the
    # CPU's bins exactly, CONTRACT §4)
    x, t = _data(n, 50, dtype=torch.float64, seed=n + k, ignore=True)
    temps = torch.linspace(0.3, 4.0, k, dtype=torch.float64)
    beta = ck.calibration.bin_boundaries(n_bins, torch.device("cpu"))
    if backend == "triton":
        ck.ops.load_triton()
        gpu = ck.ops.calibration_sweep_triton(x.cuda(), t.cuda(), temps.cuda(), beta.cuda(), -100)
    else:
        gpu = ck.ops.calibration_sweep(x.cuda(), t.cuda(), temps, beta.cuda(), -100)
    cpu = ck.ops.calibration_sweep(x, t, temps, beta, -100)
    for name, a, b in zip(["counts", "conf_sums", "hits", "nll_sums"], gpu, cpu):
        if a.dtype == torch.int64:
            assert torch.equal(a.cpu(), b), name
        else:
            torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12, msg=name)
    kept = int((t != -100).sum())
    assert gpu[0].sum(1).eq(kept).all()  # every kept row in one bin at every temperature


# Row lengths at every edge of the CUDA rows kernel's layouts (in 16-byte chunks: 1-4, 5-8, 9-16,
# 17-31 with 4 threads a row, then 8 chunks a thread from 4 to 512 threads, 4096 the last held in
# registers) and beyond (streamed), aligned rows and rows whose length is not a multiple of 16 B.
LAYOUT_CLASSES = {torch.float32: [1, 3, 4, 17, 20, 33, 64, 124, 128, 132, 1000, 4100, 16384, 16388],
                  torch.bfloat16: [3, 8, 10, 40, 100, 129, 256, 1000, 1024, 1032, 32768, 32776],
                  torch.float16: [7, 64, 250, 2000, 32000]}


def _layout_case(n, c, dtype, seed):
    """Logits with ignored and out-of-range targets, rows whose max is shared (argmax: the first),
    a confident row, a row with -inf values; and the same rows as probabilities."""
    x, t = _data(n, c, dtype=torch.float64, seed=seed, ignore=True)
    x[1] = 0.25  # every class ties: the first index is the prediction
    t[1] = 0
    if c > 1:
        x[2, c // 2] = 40.0  # p_y -> 1: sums that leave out the true class
        t[2] = c // 2
        x[4, : c // 2] = float("-inf")
        t[4] = c - 1
    t[3] = c + 5  # out of range: NaN on the GPU (the CPU raises), left out below
    return x, t


def _op_outputs(inp, t, n_bins, from_logits):
    beta = ck.calibration.bin_boundaries(n_bins, inp.device)
    mode = {True: 1, False: 0, None: -1}[from_logits]
    return torch.ops.calibkernels.calibration_bins(inp, t, beta, mode, -100, False, True)


def _state_from_samples(conf, correct, t, n_bins):
    """The top-label state of per-sample confidences, formed on the CPU in float64."""
    kept = t != -100
    conf, correct = conf[kept].double().cpu(), correct[kept].cpu()
    bins = reference._bin_of(conf, n_bins)
    return (torch.bincount(bins, minlength=n_bins),
            torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf),
            torch.bincount(bins, weights=correct.double(), minlength=n_bins).long())


@pytest.mark.parametrize("dtype", list(LAYOUT_CLASSES), ids=str)
@pytest.mark.parametrize("from_logits", [True, False, None])
def test_gpu_rows_layouts_match_cpu(dtype, from_logits):
    for c in LAYOUT_CLASSES[dtype]:
        n = 37 if c < 4000 else 9  # several rows a block, a partial last block
        x, t = _layout_case(n, c, dtype, seed=c)
        inp = (x if from_logits is not False else x.softmax(1)).to(dtype)
        keep = t != c + 5
        gpu = _op_outputs(inp.cuda(), t.cuda(), 15, from_logits)
        cpu = _op_outputs(inp[keep], t[keep], 15, from_logits)
        msg = f"C={c}"
        assert torch.isnan(gpu[6][3]), msg  # the out-of-range target: NaN, never read
        kept = t[keep] != -100
        torch.testing.assert_close(gpu[6][keep][kept].cpu(), cpu[6][kept], rtol=2e-6, atol=1e-7,
                                   msg=msg)
        assert torch.equal(gpu[7][keep].cpu(), cpu[7]), msg  # the prediction, ties: the first
        assert gpu[8][2].item() == cpu[8][2].item(), msg  # the same reading
        # the top kernel: the state of the rows kernel's own samples, and its errors
        good = _op_outputs(inp[keep].cuda(), t[keep].cuda(), 15, from_logits)
        counts, sums, hits = _state_from_samples(good[6], good[7], t[keep], 15)
        assert torch.equal(good[0].cpu(), counts) and torch.equal(good[2].cpu(), hits), msg
        torch.testing.assert_close(good[1].cpu(), sums, rtol=1e-12, atol=1e-12, msg=msg)
        torch.testing.assert_close(good[8][:2].cpu(), cpu[8][:2], rtol=1e-5, atol=1e-6, msg=msg)
        torch.testing.assert_close(
            good[8][3:].cpu(), ck.calibration.binned_errors(good[0], good[1], good[2]).cpu(),
            rtol=1e-12, atol=1e-15, msg=msg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_bins", [1, 15, 255, 300])
def test_gpu_top_state_over_many_blocks(backend, n_bins):
    # 1024 rows a block of the top kernel: partial last block, the reading decided over all of
    # them (a value outside [0, 1] in the last block only), bins over and under 256 threads
    x, t = _data(5000, 10, dtype=torch.float32, seed=n_bins, ignore=True)
    p = x.softmax(1)
    for inp in [x, p]:
        s = ck.calibration_bins(inp.cuda(), t.cuda(), n_bins, backend=backend)
        ref = ck.calibration_bins(inp, t, n_bins)
        assert abs(s.counts.cpu() - ref.counts).sum() <= 5 and s.counts.sum() == ref.counts.sum()
        torch.testing.assert_close(ck.ece(inp.cuda(), t.cuda(), n_bins, backend=backend).cpu(),
                                   ck.ece(inp, t, n_bins), rtol=1e-4, atol=1e-5)
    p[4990, 3] = 1.5  # now logits (torchmetrics' rule), decided on the device
    torch.testing.assert_close(ck.ece(p.cuda(), t.cuda(), n_bins, backend=backend).cpu(),
                               ck.ece(p, t, n_bins, from_logits=True), rtol=1e-4, atol=1e-5)
    empty = ck.calibration_bins(x[:0].cuda(), t[:0].cuda(), n_bins, backend=backend)
    assert empty.counts.sum() == 0 and empty.brier == 0
    assert torch.isnan(ck.ece(x[:0].cuda(), t[:0].cuda(), n_bins, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("from_logits", [True, None])
def test_gpu_ece_is_two_launches(backend, from_logits):
    # the rows, then the top-label state, its reading and the errors: nothing else on the device
    x, t = _data(4096, 100, dtype=torch.float32, seed=9, ignore=True)
    x, t = x.cuda(), t.cuda()
    ck.ece(x, t, from_logits=from_logits, backend=backend)  # warm-up: Triton compiles
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ck.ece(x, t, from_logits=from_logits, backend=backend)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 2, kernels
