"""The whole calibration report and the temperature sweep from one read of the logits, the meter's
merge / to / repr and sync without a process group, the torchmetrics adapters, and reliability
diagrams that leave matplotlib's global state alone."""

import pytest
import torch

import calibkernels as ck
from calibkernels import reference
from calibkernels.calibration import bin_boundaries, per_sample
from test_calibration import _data


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("ignore", [False, True])
def test_report_is_every_metric_at_once(dtype, ignore):
    x, t = _data(2000, 10, dtype=dtype, seed=20, ignore=ignore)
    report = ck.calibration_report(x, t, 15)
    assert set(report) == {"ece", "mce", "rmsce", "classwise_ece", "adaptive_ece", "brier",
                           "nll", "accuracy", "n"}
    keep = t != -100
    assert report["n"] == keep.sum()
    for name, fn in [("ece", ck.ece), ("mce", ck.mce), ("rmsce", ck.rmsce),
                     ("classwise_ece", ck.classwise_ece), ("adaptive_ece", ck.adaptive_ece)]:
        torch.testing.assert_close(report[name], fn(x, t))
    acc = (x[keep].argmax(1) == t[keep]).double().mean()
    torch.testing.assert_close(report["accuracy"], acc)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(report["brier"], reference.brier_score(x.double(), t), **tol)
    torch.testing.assert_close(report["nll"], torch.nn.functional.cross_entropy(
        x.double(), t, ignore_index=-100), **tol)


def test_report_brier_and_nll_keep_their_precision_when_confident():
    # p_y -> 1: Brier ~ (1 - p_y)^2 and NLL ~ 1 - p_y, tiny; sums that leave out the true class
    x = torch.zeros(4, 5)
    x[:, 0] = torch.tensor([10.0, 15.0, 20.0, 25.0])
    t = torch.zeros(4, dtype=torch.long)
    r = ck.calibration_report(x, t)
    x64 = x.double()
    assert abs(r["nll"] / torch.nn.functional.cross_entropy(x64, t) - 1) < 1e-5
    assert abs(r["brier"] / reference.brier_score(x64, t) - 1) < 1e-4


def test_report_from_probabilities():
    x, t = _data(1000, 7, seed=21)
    p = x.softmax(1)
    r = ck.calibration_report(p, t)
    torch.testing.assert_close(r["brier"], reference.brier_score(p, t, from_logits=False))
    torch.testing.assert_close(r["nll"], reference.nll(p, t, from_logits=False))


def test_sweep_equals_one_call_per_temperature():
    x, t = _data(3000, 10, dtype=torch.float32, seed=22, ignore=True)
    temps = [0.25, 0.5, 0.9, 1.0, 1.7, 3.0, 10.0]
    sweep = ck.calibration_sweep(x, t, temps)
    keep = t != -100
    for k, temp in enumerate(temps):
        z = x / temp
        nll = torch.nn.functional.cross_entropy(z.double(), t, ignore_index=-100)
        torch.testing.assert_close(sweep["nll"][k], nll, rtol=1e-5, atol=1e-7)
        # softmax(x / T) formed another way may move a confidence within an ulp of an edge
        conf = z[keep].double().softmax(1).amax(1)
        near = ((conf[:, None] - bin_boundaries(15).double()).abs() < 1e-6).sum().item()
        # (and the float32 confidences themselves by an ulp: 1e-6 on the ECE)
        assert abs(sweep["ece"][k].item() - ck.ece(z, t).item()) <= 2 * near / keep.sum() + 1e-6


def test_fit_temperature_ece_uses_the_sweep_and_refuses_non_finite_logits():
    x, t = _data(2000, 10, dtype=torch.float64, seed=23)
    grid = [i / 10 for i in range(1, 101)]
    eces = ck.calibration_sweep(x, t, grid)["ece"]
    assert ck.fit_temperature(x, t, criterion="ece") == grid[int(eces.argmin())]
    for bad in [float("nan"), float("inf")]:
        y = x.clone()
        y[3, 2] = bad
        for criterion in ["nll", "ece"]:
            with pytest.raises(ValueError, match="not finite"):
                ck.fit_temperature(y, t, criterion=criterion)


def test_meter_merge_to_repr_and_sync_without_a_process_group():
    x, t = _data(3000, 10, dtype=torch.float32, seed=24, ignore=True)
    a = ck.CalibrationMeter(classwise=True, adaptive=True).update(x[:1000], t[:1000])
    b = ck.CalibrationMeter(classwise=True, adaptive=True).update(x[1000:], t[1000:])
    whole = ck.CalibrationMeter(classwise=True, adaptive=True).update(x, t).compute()
    for merged in [a + b, ck.CalibrationMeter(classwise=True, adaptive=True).merge(a).merge(b)]:
        for k, v in merged.compute().items():
            torch.testing.assert_close(v, whole[k])
    assert a.compute()["n"] == (t[:1000] != -100).sum()  # + leaves its operands alone
    assert a.sync() is a  # no process group: a no-op
    r = repr(a)
    assert "n_bins=15" in r and "classwise" in r and f"{int((t[:1000] != -100).sum())}" in r
    assert a.to("cpu").compute()["n"] == (t[:1000] != -100).sum()
    with pytest.raises(ValueError, match="same n_bins"):
        a.merge(ck.CalibrationMeter(n_bins=10))
    for k, v in ck.CalibrationMeter(classwise=True).update(x, t).compute().items():
        torch.testing.assert_close(v, whole[k])
    assert {"brier", "nll", "accuracy"} <= set(whole)


def test_torchmetrics_adapters():
    from calibkernels.torchmetrics_adapter import (AdaptiveCalibrationError,
                                                   BinnedCalibrationError,
                                                   ClasswiseCalibrationError)

    x, t = _data(2000, 6, dtype=torch.float32, seed=25, ignore=True)
    xk, tk = x.reshape(500, 4, 6).movedim(2, 1), t.reshape(500, 4)  # (N, C, d) inputs
    metrics = {"ece": BinnedCalibrationError(num_classes=6),
               "classwise": ClasswiseCalibrationError(num_classes=6),
               "adaptive": AdaptiveCalibrationError(num_classes=6)}
    for m in metrics.values():
        for chunk in range(0, 500, 128):
            m.update(xk[chunk:chunk + 128], tk[chunk:chunk + 128])
    torch.testing.assert_close(metrics["ece"].compute(), ck.ece(x, t))
    torch.testing.assert_close(metrics["classwise"].compute(), ck.classwise_ece(x, t))
    torch.testing.assert_close(metrics["adaptive"].compute(), ck.adaptive_ece(x, t))
    p = x.softmax(1)  # probabilities: decided from the values, as torchmetrics does
    m = BinnedCalibrationError(num_classes=6)
    m.update(p, t)
    torch.testing.assert_close(m.compute(), ck.ece(x, t), rtol=1e-6, atol=1e-7)
    fig, ax = metrics["ece"].plot()
    assert ax in fig.axes and "ECE" in ax.get_title()
    with pytest.raises(ValueError, match="needs num_classes"):
        ClasswiseCalibrationError()
    with pytest.raises(ValueError, match="num_classes=5, but the input has 6 classes"):
        BinnedCalibrationError(num_classes=5).update(x, t)


def test_reliability_diagram_leaves_pyplot_and_the_backend_alone(tmp_path):
    import gc
    import sys

    import matplotlib

    backend = matplotlib.get_backend()
    had_pyplot = "matplotlib.pyplot" in sys.modules
    x, t = _data(500, 10, dtype=torch.float32, seed=26)
    for epoch in range(3):  # a diagram per epoch
        fig = ck.reliability_diagram(x, t, path=tmp_path / f"epoch{epoch}.png")
        assert fig.axes and (tmp_path / f"epoch{epoch}.png").stat().st_size > 10_000
        del fig
        gc.collect()
    assert matplotlib.get_backend() == backend
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules
    else:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    assert ck.reliability_diagram(x, t, ax=ax) is ax.figure


def test_per_sample_of_probabilities():
    x, t = _data(100, 4, seed=27)
    conf, correct = per_sample(x.softmax(1), t)
    torch.testing.assert_close(conf, x.softmax(1).amax(1))
