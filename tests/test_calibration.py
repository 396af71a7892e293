"""Calibration metrics (fused CPU kernel) against the eager reference, torchmetrics and netcal."""

import pytest
import torch

import calibkernels as ck
from calibkernels import reference
from calibkernels.calibration import binned_error, per_sample
from helpers import make_logits

torch_mc = pytest.importorskip("torchmetrics.functional.classification")


def _data(n, c, dtype=torch.float64, seed=0, ignore=False, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    # a model that is right more often than chance, so that accuracy varies over the bins
    right = torch.rand(n, generator=g) < 0.5
    t[right] = x[right].argmax(1)
    if ignore:
        t[::7] = -100
    return x, t


CASES = [(500, 1), (600, 2), (700, 3), (1000, 10), (800, 100)]


@pytest.mark.parametrize("n,c", CASES)
@pytest.mark.parametrize("n_bins", [1, 5, 15, 20])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("ignore", [False, True])
def test_matches_reference_float64(n, c, n_bins, from_logits, ignore):
    x, t = _data(n, c, seed=n_bins, ignore=ignore)
    inp = x if from_logits else x.softmax(1)
    kw = dict(n_bins=n_bins, from_logits=from_logits)
    for norm in ["l1", "max", "l2"]:
        torch.testing.assert_close(ck.calibration_error(inp, t, norm=norm, **kw),
                                   reference.calibration_error(inp, t, norm=norm, **kw),
                                   rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ck.classwise_ece(inp, t, **kw), reference.classwise_ece(inp, t, **kw),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ck.adaptive_ece(inp, t, **kw), reference.adaptive_ece(inp, t, **kw),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_inputs_match_reference_on_the_same_values(dtype):
    x, t = _data(2000, 10, dtype=dtype, seed=1)
    # Softmax in float32 may differ from torch's by an ulp or two (another exp; an FMA or not,
    # by SIMD level), which decides the bin of a confidence within those ulps of an edge: keep
    # the rows whose top-label and per-class probabilities are clear of every edge.
    p = x.float().softmax(1)
    edges = torch.linspace(0, 1, 16)
    clear = ((p[..., None] - edges).abs() > 1e-6).all(-1).all(-1)
    x, t = x[clear], t[clear]
    assert len(t) > 1900
    for norm in ["l1", "max", "l2"]:
        torch.testing.assert_close(ck.calibration_error(x, t, norm=norm),
                                   reference.calibration_error(x, t, norm=norm),
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ck.classwise_ece(x, t), reference.classwise_ece(x, t),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("n_bins", [10, 15])
def test_matches_torchmetrics(norm, n_bins):
    # Random continuous confidences never sit on a bin edge, where the conventions differ.
    x, t = _data(5000, 10, dtype=torch.float32, seed=2)
    p = x.softmax(1)
    expected = torch_mc.multiclass_calibration_error(p, t, 10, n_bins=n_bins, norm=norm)
    torch.testing.assert_close(ck.calibration_error(p, t, n_bins, norm, from_logits=False).float(),
                               expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ck.calibration_error(x, t, n_bins, norm).float(), expected,
                               rtol=1e-5, atol=1e-6)


def test_torchmetrics_adapter_matches_functional():
    from calibkernels.torchmetrics_adapter import BinnedCalibrationError

    x, t = _data(3000, 10, dtype=torch.float32, seed=3)
    for norm in ["l1", "l2", "max"]:
        metric = BinnedCalibrationError(n_bins=15, norm=norm)
        for chunk in range(0, 3000, 700):
            metric.update(x[chunk:chunk + 700], t[chunk:chunk + 700])
        torch.testing.assert_close(metric.compute(), ck.calibration_error(x, t, norm=norm))
        assert metric.counts.numel() == 15  # O(n_bins) state, summed on sync


def test_matches_netcal_ece():
    netcal = pytest.importorskip("netcal.metrics")
    x, t = _data(5000, 10, dtype=torch.float64, seed=4)
    p = x.softmax(1)
    expected = netcal.ECE(bins=15).measure(p.numpy(), t.numpy())
    assert abs(ck.ece(p, t, from_logits=False).item() - expected) < 1e-9


def test_confidences_on_bin_edges():
    n_bins = 15
    beta = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32)
    conf = torch.cat([beta, beta[1:-1]])  # 0, every k/15 and 1.0 (some twice)
    probs = torch.zeros(len(conf), 3, dtype=torch.float32)
    probs[:, 0] = conf
    t = torch.zeros(len(conf), dtype=torch.long)
    table = ck.reliability_table(probs, t, n_bins, from_logits=False)
    # bins are (lo, hi]: beta_k lands in bin k - 1, and 0 in bin 0. So bin 0 holds 0 and beta_1
    # twice, bins 1..13 hold beta_{k+1} twice, bin 14 holds 1.0 once.
    assert table["count"].tolist() == [3] + [2] * 13 + [1]
    ref_bins = reference._bin_of(conf, n_bins)
    assert torch.equal(torch.bincount(ref_bins, minlength=n_bins), table["count"])


def test_ignore_index_and_empty():
    x, t = _data(100, 5, seed=5)
    t[:] = -100
    for fn in [ck.ece, ck.mce, ck.rmsce, ck.classwise_ece, ck.adaptive_ece]:
        assert torch.isnan(fn(x, t))
    x0, t0 = torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)
    assert torch.isnan(ck.ece(x0, t0))


def test_deterministic_over_reruns_and_thread_counts():
    x, t = _data(20000, 37, dtype=torch.float32, seed=6)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in [1, 2, 3, 4, old] + [old] * 8:  # more threads than cores: stealing
            torch.set_num_threads(threads)
            s = ck.calibration_bins(x, t, 15, classwise=True)
            results.append([s.counts, s.conf_sums, s.hits, s.cw_counts, s.cw_conf_sums,
                            s.cw_hits])
    finally:
        torch.set_num_threads(old)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, results[0]))


def test_per_sample_confidence_and_argmax_ties():
    x = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [0.0, -1.0, 5.0]])
    t = torch.tensor([1, 0, 1])
    conf, correct = per_sample(x, t)
    torch.testing.assert_close(conf, x.softmax(1).amax(1))
    assert correct.tolist() == [True, True, False]  # lowest index wins ties, as torch.argmax


def poisoned_logits(c, dtype=torch.float32, seed=0):
    """Rows torch.argmax calls right but whose confidence is NaN (all NaN, NaN or +inf at the
    target, NaN beside it, all -inf, a NaN first then -inf up to the target, the max: a streamed
    row's first blocks hold no finite value), each kind at the start, middle and end of a row,
    among clean rows: (logits, target, the expected correctness)."""
    x, t = _data(64, c, dtype=torch.float64, seed=seed)
    nan, inf = float("nan"), float("inf")
    r = 0
    for k in sorted({0, c // 2, c - 1}):
        for poison in ["all", "nan_at_target", "nan_beside", "inf_at_target", "all_-inf",
                       "nan_then_-inf"]:
            t[r] = k
            if poison == "nan_then_-inf":
                x[r, k] = x[r].max() + 1
                x[r, 1:k] = -inf
                x[r, 0] = nan
            elif poison == "all":
                x[r] = nan
            elif poison == "all_-inf":
                x[r] = -inf
            elif poison == "nan_beside":
                x[r, k] = x[r].max() + 1  # the target is the max of the other values
                x[r, (k + 1) % c] = nan
            else:
                x[r, k] = nan if poison == "nan_at_target" else inf
            r += 1
    x = x.to(dtype)
    conf, pred = x.double().softmax(1).max(1)  # the values as passed: rounding may make ties
    return x, t, (pred == t) & ~conf.isnan()


def sweep_hits(x, t, backend="cpu"):
    """The temperature sweep op's hits at T = 0.5, 1, 2, summed over the bins."""
    temps = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    beta = ck.calibration.bin_boundaries(15, x.device)
    if backend == "triton":
        ck.ops.load_triton()
        out = ck.ops.calibration_sweep_triton(x, t, temps.to(x.device), beta, -100)
    else:
        out = ck.ops.calibration_sweep(x, t, temps, beta, -100)
    return out[2].sum(1).cpu()


def raw_per_sample(x, t, mode, backend="cpu", ignore_index=-100):
    """The calibration_bins op's per-sample (confidence, correct) of every row, ignored ones too
    (the public per_sample drops those)."""
    beta = ck.calibration.bin_boundaries(15, x.device)
    if backend == "triton":
        ck.ops.load_triton()
        out = ck.ops.calibration_bins_triton(x, t, beta, mode, ignore_index, False, True)
    else:
        out = ck.ops.calibration_bins(x, t, beta, mode, ignore_index, False, True)
    return out[6].cpu(), out[7].cpu()


def ignored_rows_case(ignore_index):
    """(logits, probabilities, target): every 7th row ignored, its probabilities out of [0, 1]
    (never read); with ignore_index a class, the argmax of an ignored row is that class."""
    x, t = _data(60, 9, dtype=torch.float32, seed=12, ignore=True)
    if ignore_index >= 0:
        t[t == ignore_index] = ignore_index + 1
        x[::7, ignore_index] += 20.0
        t[::7] = ignore_index
    p = x.softmax(1)
    p[t == ignore_index] = 5.0
    return x, p, t


@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_per_sample_of_an_ignored_row_is_0_and_not_correct(ignore_index):
    x, p, t = ignored_rows_case(ignore_index)
    ignored = t == ignore_index
    for inp, mode in [(x, 1), (p, 0), (p, -1)]:
        conf, correct = raw_per_sample(inp, t, mode, ignore_index=ignore_index)
        assert conf[ignored].eq(0).all() and not correct[ignored].any(), mode
        assert conf[~ignored].gt(0).all() and correct[~ignored].any(), mode


def test_a_nan_confidence_is_never_correct():
    # torch.argmax names the first NaN; a row max may drop it: our rule is one for every backend
    for c in [2, 5, 40, 100]:
        x, t, expected = poisoned_logits(c)
        conf, correct = per_sample(x, t)
        assert torch.equal(conf.isnan(), x.double().softmax(1).amax(1).isnan())
        assert torch.equal(correct, expected), c
        s = ck.calibration_bins(x, t)
        assert s.hits.sum() == expected.sum()
        assert torch.equal(sweep_hits(x, t), expected.sum().repeat(3))  # at every temperature
        report = ck.calibration_report(x, t)
        assert all(v.isnan() for k, v in report.items() if k != "n"), report
        assert reference.calibration_error(x, t).isnan()


def assert_inf_target_logit_poisons_every_metric(device="cpu", backend="auto"):
    # +inf at the target alone: softmax is inf / inf, so NLL is NaN too (not log1p(0) = 0)
    x, t = _data(50, 7, dtype=torch.float32, seed=4)
    x[5, t[5]] = float("inf")
    x, t = x.to(device), t.to(device)
    report = ck.calibration_report(x, t, backend=backend)
    assert all(v.isnan() for k, v in report.items() if k != "n"), report
    sweep = ck.calibration_sweep(x, t, [0.5, 1.0, 2.0], backend=backend)
    assert sweep["nll"].isnan().all() and sweep["ece"].isnan().all(), sweep


def test_an_inf_target_logit_poisons_every_metric():
    assert_inf_target_logit_poisons_every_metric()


def test_meter_streams_and_round_trips():
    x, t = _data(3000, 10, dtype=torch.float32, seed=7, ignore=True)
    meter = ck.CalibrationMeter(classwise=True, adaptive=True)
    for chunk in range(0, 3000, 512):
        meter.update(x[chunk:chunk + 512], t[chunk:chunk + 512])
    got = meter.compute()
    assert got["n"] == (t != -100).sum()
    torch.testing.assert_close(got["ece"], ck.ece(x, t))
    torch.testing.assert_close(got["mce"], ck.mce(x, t))
    torch.testing.assert_close(got["rmsce"], ck.rmsce(x, t))
    torch.testing.assert_close(got["classwise_ece"], ck.classwise_ece(x, t))
    torch.testing.assert_close(got["adaptive_ece"], ck.adaptive_ece(x, t))
    again = ck.CalibrationMeter(classwise=True, adaptive=True)
    again.load_state_dict(meter.state_dict())
    for k, v in again.compute().items():
        torch.testing.assert_close(v, got[k])
    meter.reset()  # no sample: NaN metrics, as for an empty batch
    empty = meter.compute()
    assert empty["n"] == 0 and torch.isnan(empty["ece"]) and torch.isnan(empty["adaptive_ece"])


def test_reliability_diagram_draws_and_saves(tmp_path):
    import matplotlib.figure

    x, t = _data(2000, 10, dtype=torch.float32, seed=8)
    path = tmp_path / "diagram.png"
    fig = ck.reliability_diagram(x, t, title="digits", path=path)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert f"{100 * ck.ece(x, t).item():.2f}%" in fig.axes[0].get_title()
    assert path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a NaN confidence: the poisoned bin has no confidence or accuracy, and the ECE is NaN
    x[3, 2] = float("nan")
    table = ck.reliability_table(x, t)
    assert table["confidence"][0].isnan() and table["accuracy"][0].isnan()
    assert not table["accuracy"][1:][table["count"][1:] > 0].isnan().any()
    assert "ECE = nan%" in ck.reliability_diagram(table=table).axes[0].get_title()


def test_opcheck_calibration_bins():
    x, t = _data(50, 7, dtype=torch.float32, seed=9, ignore=True)
    beta = torch.linspace(0, 1, 16)
    for classwise in [False, True]:
        for per in [False, True]:
            for inp, mode in [(x, 1), (x.softmax(1), 0), (x, -1), (x.softmax(1), -1)]:
                torch.library.opcheck(torch.ops.calibkernels.calibration_bins.default,
                                      (inp, t, beta, mode, -100, classwise, per))
    temps = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    torch.library.opcheck(torch.ops.calibkernels.calibration_sweep.default,
                          (x, t, temps, beta, -100))


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, t: ck.ece(x.softmax(1) * 2, t, from_logits=False), ValueError, r"in \[0, 1\]"),
    (lambda x, t: ck.ece(-x.softmax(1), t, from_logits=False), ValueError, r"in \[0, 1\]"),
    (lambda x, t: ck.ece(x[:, :, None], t), ValueError, r"target must have shape \(40, 1\)"),
    (lambda x, t: ck.ece(x, t[:-1]), ValueError, r"target must have shape \(40,\)"),
    (lambda x, t: ck.ece(x, t.float()), ValueError, "target must hold class indices"),
    (lambda x, t: ck.ece(x.long(), t), ValueError, "must be float32, float16, bfloat16 or float64"),
    (lambda x, t: ck.ece(x, t, n_bins=0), ValueError, "n_bins must be an integer >= 1"),
    (lambda x, t: ck.ece(x, t, n_bins=2.5), ValueError, "n_bins must be an integer >= 1"),
    (lambda x, t: ck.ece(x, t, from_logits="yes"), ValueError, "from_logits must be True"),
    (lambda x, t: ck.calibration_error(x, t, norm="l3"), ValueError, "norm must be one of"),
    (lambda x, t: ck.ece(x, torch.where(t == 0, 12, t)), IndexError, "target 12 at position"),
    (lambda x, t: ck.CalibrationMeter(n_bins=0), ValueError, "n_bins must be an integer >= 1"),
    (lambda x, t: ck.calibration_sweep(x, t, []), ValueError, "1 to 256 temperatures"),
    (lambda x, t: ck.calibration_sweep(x, t, [1.0, -2.0]), ValueError, "finite and > 0"),
    (lambda x, t: ck.calibration_sweep(x, t, torch.ones(300)), ValueError, "1 to 256"),
])
def test_bad_input(call, exc, match):
    x, t = _data(40, 5, dtype=torch.float32, seed=10)
    t[0] = 0
    with pytest.raises(exc, match=match):
        call(x, t)


# ---- logits or probabilities (CONTRACT §2): never a silently wrong number ----

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_probabilities_passed_where_logits_are_expected(dtype):
    # softmax of probabilities is a plausible-looking, wrong ECE: by default the input is read as
    # probabilities when every value lies in [0, 1] (torchmetrics' rule)
    x, t = _data(3000, 10, dtype=dtype, seed=11)
    p = x.softmax(1)
    for fn in [ck.ece, ck.mce, ck.rmsce, ck.classwise_ece, ck.adaptive_ece]:
        torch.testing.assert_close(fn(p, t), fn(x, t), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(fn(p, t), fn(p, t, from_logits=False))
        assert (fn(p, t, from_logits=True) - fn(x, t)).abs() > 1e-3  # forced: softmax again
    torch.testing.assert_close(ck.ece(p, t), torch_mc.multiclass_calibration_error(
        p.float(), t, 10, n_bins=15).double(), rtol=1e-5, atol=1e-6)
    report_p, report_x = ck.calibration_report(p, t), ck.calibration_report(x, t)
    for k in report_x:
        torch.testing.assert_close(report_p[k], report_x[k], rtol=1e-5, atol=1e-6)
    meter = ck.CalibrationMeter(classwise=True, adaptive=True)
    meter.update(p[:1500], t[:1500]).update(x[1500:], t[1500:])  # decided batch by batch
    for k, v in meter.compute().items():
        torch.testing.assert_close(v, report_x[k], rtol=1e-5, atol=1e-6)


def test_ignored_samples_do_not_decide_the_reading():
    x, t = _data(500, 5, seed=12)
    p = x.softmax(1)
    p[::10] = x[::10]  # logits, but only in ignored samples: as torchmetrics, still probabilities
    t[::10] = -100
    torch.testing.assert_close(ck.ece(p, t), ck.ece(p, t, from_logits=False))


@pytest.mark.parametrize("extra", [(3,), (2, 3)])
def test_k_dimensional_inputs_are_samples_at_every_position(extra):
    x, t = make_logits(40, 6, torch.float32, extra, seed=13, ignore_index=-100,
                       requires_grad=False)
    rows = x.movedim(1, -1).reshape(-1, 6)
    flat = t.reshape(-1)
    for fn in [ck.ece, ck.mce, ck.rmsce, ck.classwise_ece, ck.adaptive_ece]:
        torch.testing.assert_close(fn(x, t), fn(rows, flat))
    report, flat_report = ck.calibration_report(x, t), ck.calibration_report(rows, flat)
    for k in report:
        torch.testing.assert_close(report[k], flat_report[k])
    meter = ck.CalibrationMeter(classwise=True)
    meter.update(x, t)
    torch.testing.assert_close(meter.compute()["classwise_ece"], ck.classwise_ece(rows, flat))
    sweep = ck.calibration_sweep(x, t, [0.5, 2.0])
    torch.testing.assert_close(sweep["nll"], ck.calibration_sweep(rows, flat, [0.5, 2.0])["nll"])


def test_integer_like_n_bins_and_uint8_targets():
    import numpy as np

    x, t = _data(300, 6, seed=14)
    expected = ck.ece(x, t, 15)
    for n_bins in [np.int64(15), np.int32(15), torch.tensor(15)]:
        torch.testing.assert_close(ck.ece(x, t, n_bins), expected)
        torch.testing.assert_close(ck.calibration_report(x, t, n_bins)["ece"], expected)
        assert ck.CalibrationMeter(n_bins).n_bins == 15
    torch.testing.assert_close(ck.ece(x, t.to(torch.uint8)), expected)


@pytest.mark.parametrize("from_logits", [True, False, None])
@pytest.mark.parametrize("n_bins", [1, 15, 300])
def test_kernel_errors_are_the_errors_of_its_state(from_logits, n_bins):
    # calibration_error reads ECE / MCE / RMSCE the kernel computed from the state it formed
    x, t = _data(3000, 10, dtype=torch.float32, seed=n_bins, ignore=True)
    inp = x if from_logits is not False else x.softmax(1)
    s = ck.calibration_bins(inp, t, n_bins, from_logits=from_logits)
    for norm in ["l1", "max", "l2"]:
        fused = ck.calibration_error(inp, t, n_bins, norm, from_logits)
        assert fused.dtype == torch.float64 and fused.dim() == 0
        torch.testing.assert_close(fused, binned_error(s.counts, s.conf_sums, s.hits, norm),
                                   rtol=1e-12, atol=1e-15)


def test_kernel_errors_of_empty_and_poisoned_states():
    x, t = _data(50, 4, dtype=torch.float32, seed=1)
    for norm in ["l1", "max", "l2"]:
        assert torch.isnan(ck.calibration_error(x[:0], t[:0], 15, norm))
        assert torch.isnan(ck.calibration_error(x, torch.full_like(t, -100), 15, norm))
        poisoned = x.clone()
        poisoned[3, 1] = float("nan")
        assert torch.isnan(ck.calibration_error(poisoned, t, 15, norm, True))
