"""The Triton calibration kernels against the C++ kernel and the reference. Without a GPU they run
in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1)."""

import importlib
import os

import pytest
import torch

import calibkernels as ck
from calibkernels import reference
from calibkernels.calibration import binned_error, classwise_ece_from_state, per_sample
from test_calibration import (_data, assert_inf_target_logit_poisons_every_metric,
                              ignored_rows_case, poisoned_logits, raw_per_sample, sweep_hits)

pytestmark = pytest.mark.skipif(
    not ck.ops.triton_available()
    or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton with a GPU or TRITON_INTERPRET=1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("n,c,n_bins", [(150, 1, 15), (200, 3, 15), (200, 10, 10), (100, 100, 15),
                                        (64, 1000, 20), (40, 4097, 15), (60, 37, 100)])
def test_triton_matches_cpp_and_reference(dtype, from_logits, n, c, n_bins):
    x, t = _data(n, c, dtype=torch.float64, seed=c, ignore=True)
    inp = (x if from_logits else x.softmax(1)).to(dtype).to(DEVICE)
    t = t.to(DEVICE)
    ours = ck.calibration_bins(inp, t, n_bins, from_logits=from_logits, classwise=True,
                               backend="triton")
    cpp = ck.calibration_bins(inp.cpu(), t.cpu(), n_bins, from_logits=from_logits, classwise=True)
    # The same float32 probabilities bin identically; from logits the exp may differ by an ulp.
    exact = not from_logits
    for name in ["counts", "hits", "cw_counts", "cw_hits"]:
        a, b = getattr(ours, name).cpu(), getattr(cpp, name)
        if exact:
            assert torch.equal(a, b), name
        else:
            assert (a - b).abs().sum() <= 2, name  # at most a sample on a bin edge moves
    # Metrics from the Triton state, against the eager reference (one kernel call each).
    for norm in ["l1", "max", "l2"]:
        torch.testing.assert_close(
            binned_error(ours.counts, ours.conf_sums, ours.hits, norm).cpu(),
            reference.calibration_error(inp.cpu(), t.cpu(), n_bins, norm, from_logits),
            rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        classwise_ece_from_state(ours.cw_counts, ours.cw_conf_sums, ours.cw_hits).cpu(),
        reference.classwise_ece(inp.cpu(), t.cpu(), n_bins, from_logits), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        ck.adaptive_ece(inp, t, n_bins, from_logits, backend="triton").cpu(),
        reference.adaptive_ece(inp.cpu(), t.cpu(), n_bins, from_logits), rtol=1e-5, atol=1e-6)


def test_triton_bin_edges_identical_to_cpp():
    beta = torch.linspace(0, 1, 16, dtype=torch.float32)
    probs = torch.zeros(31, 3)
    probs[:, 0] = torch.cat([beta, beta[1:]])
    t = torch.zeros(31, dtype=torch.long)
    ours = ck.calibration_bins(probs.to(DEVICE), t.to(DEVICE), 15, from_logits=False,
                               backend="triton")
    cpp = ck.calibration_bins(probs, t, 15, from_logits=False)
    assert torch.equal(ours.counts.cpu(), cpp.counts)


def test_triton_poisons_bad_samples_instead_of_reading_astray():
    x = torch.rand(6, 4, device=DEVICE)
    t = torch.tensor([0, 1, 9, 2, 3, 0], device=DEVICE)  # 9 is out of range
    assert torch.isnan(ck.ece(x, t, backend="triton"))
    t[2] = 1
    p = x.softmax(1)
    p[4, 1] = 1.5  # not a probability
    assert torch.isnan(ck.ece(p, t, from_logits=False, backend="triton"))
    assert torch.isfinite(ck.ece(x.softmax(1), t, from_logits=False, backend="triton"))


@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_triton_per_sample_of_every_row_matches_cpu(ignore_index):
    # the op's raw per-sample outputs, ignored rows included (0 and not correct on every backend)
    x, p, t = ignored_rows_case(ignore_index)
    for inp, mode in [(x, 1), (p, 0), (p, -1)]:
        conf, correct = raw_per_sample(inp.to(DEVICE), t.to(DEVICE), mode, "triton", ignore_index)
        cpu_conf, cpu_correct = raw_per_sample(inp, t, mode, ignore_index=ignore_index)
        torch.testing.assert_close(conf, cpu_conf, rtol=1e-6, atol=1e-7, msg=str(mode))
        assert torch.equal(correct, cpu_correct), mode


def test_triton_never_counts_a_nan_confidence_correct():
    # the rule must not depend on whether a max keeps a NaN (numpy's and a GPU's differ);
    # 5000 classes: the rows kernel streams 4096 at a time
    for c in [2, 5, 40, 100, 5000]:
        x, t, expected = poisoned_logits(c)
        conf, correct = per_sample(x.to(DEVICE), t.to(DEVICE), backend="triton")
        assert torch.equal(correct.cpu(), expected), c
        assert torch.equal(conf.isnan().cpu(), per_sample(x, t)[0].isnan()), c
        s = ck.calibration_bins(x.to(DEVICE), t.to(DEVICE), backend="triton")
        assert s.hits.sum().item() == expected.sum().item()
        assert torch.equal(sweep_hits(x.to(DEVICE), t.to(DEVICE), "triton"),
                           expected.sum().repeat(3))
        report = ck.calibration_report(x.to(DEVICE), t.to(DEVICE), backend="triton")
        assert all(v.isnan() for k, v in report.items() if k != "n"), report
    # a value outside [0, 1] poisons the probability reading (the CPU raises): never correct
    x, t = _data(40, 7, dtype=torch.float32, seed=9)
    p = x.softmax(1)
    p[3, t[3]] = 1.5  # the argmax, at the target
    conf, correct = per_sample(p.to(DEVICE), t.to(DEVICE), from_logits=False, backend="triton")
    assert conf[3].isnan() and not correct[3]
    assert torch.equal(correct.cpu(), (p.argmax(1) == t) & (torch.arange(40) != 3))
    s = ck.calibration_bins(p.to(DEVICE), t.to(DEVICE), from_logits=False, backend="triton")
    assert s.hits.sum().item() == correct.sum().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("probabilities", [False, True])
def test_triton_report_matches_cpp(dtype, probabilities):
    x, t = _data(300, 17, dtype=torch.float64, seed=5, ignore=True)
    inp = (x.softmax(1) if probabilities else x).to(dtype)
    ours = ck.calibration_report(inp.to(DEVICE), t.to(DEVICE), backend="triton")
    cpp = ck.calibration_report(inp, t)
    for k, v in cpp.items():
        torch.testing.assert_close(ours[k].cpu(), v, rtol=1e-5, atol=1e-6, msg=k)


def test_triton_sweep_matches_cpp():
    x, t = _data(400, 13, dtype=torch.float32, seed=6, ignore=True)
    temps = [0.3, 1.0, 2.5]
    ours = ck.calibration_sweep(x.to(DEVICE), t.to(DEVICE), temps, backend="triton")
    cpp = ck.calibration_sweep(x, t, temps)
    torch.testing.assert_close(ours["nll"].cpu(), cpp["nll"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours["ece"].cpu(), cpp["ece"], rtol=1e-4, atol=1e-5)


def test_triton_inf_target_logit_poisons_every_metric():
    assert_inf_target_logit_poisons_every_metric(DEVICE, "triton")


def test_triton_sweep_op_reads_strided_temperatures():
    # the op called directly with a float64 view on the device: read with its stride
    x, t = _data(50, 13, dtype=torch.float32, seed=8)
    temps = torch.tensor([0.3, 9.0, 1.0, 9.0, 2.5], dtype=torch.float64, device=DEVICE)
    beta = ck.calibration.bin_boundaries(15, DEVICE)
    ck.ops.load_triton()
    op = ck.ops.calibration_sweep_triton
    strided = op(x.to(DEVICE), t.to(DEVICE), temps[::2], beta, -100)
    dense = op(x.to(DEVICE), t.to(DEVICE), temps[::2].contiguous(), beta, -100)
    for a, b in zip(strided, dense):
        assert torch.equal(a, b)


def test_triton_sweep_takes_only_finite_positive_temperatures():
    x, t = _data(40, 13, dtype=torch.float32, seed=7)
    for bad in [-2.0, 0.0, float("inf"), float("nan")]:
        with pytest.raises(ValueError, match="temperatures must be finite and > 0"):
            ck.calibration_sweep(x.to(DEVICE), t.to(DEVICE), [1.0, bad], backend="triton")
    # the op with its temperatures on the device cannot raise without a sync: that T is NaN
    ck.ops.load_triton()
    beta = ck.calibration.bin_boundaries(15, DEVICE)
    temps = torch.tensor([1.0, -2.0, 0.0, 2.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="temperatures must be finite and > 0, got -2.0"):
        ck.ops.calibration_sweep_triton(x.to(DEVICE), t.to(DEVICE), temps, beta, -100)
    if DEVICE == "cuda":
        nll = ck.ops.calibration_sweep_triton(x.cuda(), t.cuda(), temps.cuda(), beta, -100)[3]
        assert nll.isnan().tolist() == [False, True, True, False]


def test_triton_sweep_poisons_an_out_of_range_target():
    # the C++ CPU kernel raises; the GPU kernels give NaN (never a number read from column 0)
    x, t = _data(40, 13, dtype=torch.float32, seed=7, ignore=True)
    for bad in [13, -7]:
        t[3] = bad
        ours = ck.calibration_sweep(x.to(DEVICE), t.to(DEVICE), [0.5, 1.0], backend="triton")
        assert ours["nll"].isnan().all() and ours["ece"].isnan().all(), bad


def test_triton_sweep_keeps_a_nan_seen_before_the_first_finite_logit():
    # 256 temperatures: the row is read 32 classes at a time; its first piece holds only a NaN
    # and -inf, so the max is still -inf when the NaN is summed (it was reset to 0 there)
    x, t = _data(8, 100, dtype=torch.float32, seed=9)
    x[5, 0], x[5, 1:40], t[5] = float("nan"), float("-inf"), 60
    temps = torch.linspace(0.1, 10.0, 256, dtype=torch.float64)
    for out in [ck.calibration_sweep(x, t, temps),
                ck.calibration_sweep(x.to(DEVICE), t.to(DEVICE), temps, backend="triton")]:
        assert out["nll"].isnan().all() and out["ece"].isnan().all()


def test_triton_takes_at_most_1024_bins_and_auto_leaves_it_beyond(monkeypatch):
    focal_loss_module = importlib.import_module("calibkernels.focal_loss")  # not the function
    x, t = _data(20, 5, dtype=torch.float32, seed=3)
    ck.ece(x.to(DEVICE), t.to(DEVICE), 1024, backend="triton")  # the largest it takes
    for call in [lambda b: ck.ece(x.to(DEVICE), t.to(DEVICE), b, backend="triton"),
                 lambda b: ck.calibration_sweep(x.to(DEVICE), t.to(DEVICE), [1.0], b,
                                                backend="triton")]:
        with pytest.raises(ValueError, match=r"Triton kernels take n_bins <= 1024, got 1025"):
            call(1025)
    # "auto" where the rows are long enough for Triton: Triton up to 1024 bins, CUDA C++ beyond
    monkeypatch.setattr(focal_loss_module, "resolve_backend", lambda *args, **kw: "triton")
    assert ck.calibration._kernel("auto", x, 1024) == "triton"
    assert ck.calibration._kernel("auto", x, 1025) == "cuda"
    assert ck.calibration._kernel("triton", x, 1024) == "triton"


@pytest.mark.parametrize("n_bins", [1, 15, 300])
def test_triton_top_state_in_one_launch_matches_cpp(n_bins):
    # the last program sums every chunk's partials (300 bins: 16-row chunks, two a step of its
    # loop), keeps the reading of all chunks (a value outside [0, 1] in the last one only makes
    # them logits) and writes the errors of the state it kept; an empty batch gives NaN errors
    x, t = _data(100, 10, dtype=torch.float32, seed=n_bins + 8, ignore=True)
    p = x.softmax(1)
    # exact counts from logits: no confidence within 1e-5 of an edge, where a GPU's approximate
    # exp and division (a few ulp) could move it a bin over
    edges = ck.calibration.bin_boundaries(n_bins).double()
    assert (p.double().amax(1)[:, None] - edges).abs().min() > 1e-5
    for inp in [x, p]:
        ours = ck.calibration._fused(inp.to(DEVICE), t.to(DEVICE), n_bins, None, -100, False,
                                     False, "triton")
        cpp = ck.calibration._fused(inp, t, n_bins, None, -100, False, False, "cpu")
        assert torch.equal(ours[0].cpu(), cpp[0]) and torch.equal(ours[2].cpu(), cpp[2])
        torch.testing.assert_close(ours[1].cpu(), cpp[1], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(ours[8].cpu(), cpp[8], rtol=1e-6, atol=1e-9)
    p[99, 3] = 1.5
    torch.testing.assert_close(ck.ece(p.to(DEVICE), t.to(DEVICE), n_bins, backend="triton").cpu(),
                               ck.ece(p, t, n_bins, from_logits=True), rtol=1e-6, atol=1e-9)
    empty = ck.calibration_bins(x[:0].to(DEVICE), t[:0].to(DEVICE), n_bins, backend="triton")
    assert empty.counts.sum() == 0 and empty.brier == 0
    for metric in [ck.ece, ck.mce, ck.rmsce]:
        assert torch.isnan(metric(x[:0].to(DEVICE), t[:0].to(DEVICE), n_bins, backend="triton"))
