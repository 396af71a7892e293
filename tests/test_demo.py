"""The main job (`make demo`) and `python -m calibkernels bench`."""

import json

import pytest

from calibkernels.__main__ import main

KEYS = {"test_error", "ece", "adaece", "classwise_ece", "temperature", "ece_after_t",
        "adaece_after_t", "classwise_ece_after_t", "test_nll_per_epoch"}


def test_demo_trains_reports_and_writes(tmp_path, capsys):
    out, js = tmp_path / "demo", tmp_path / "demo.json"
    main(["demo", "--epochs", "4", "--device", "cpu", "--out", str(out), "--json", str(js)])
    printed = capsys.readouterr().out
    results = json.loads(js.read_text())["losses"]
    assert set(results) == {"CE", "FL-3", "FLSD-53"}
    for name, r in results.items():
        assert set(r) == KEYS
        assert len(r["test_nll_per_epoch"]) == 4
        assert r["test_nll_per_epoch"][-1] < r["test_nll_per_epoch"][0]
        assert r["test_error"] < 15.0  # a 64-256-10 MLP learns digits within a few epochs
        assert 0.1 <= r["temperature"] <= 10.0
        # every number in the JSON is the one printed in the table
        row = next(line for line in printed.splitlines()
                   if line.startswith(name + " ") and "T = " in line)
        for key in ["test_error", "ece", "ece_after_t", "adaece", "classwise_ece_after_t"]:
            assert f"{r[key]:.2f}" in row
        assert (out / f"reliability_{name}.png").stat().st_size > 10_000
    assert (out / "test_nll.png").stat().st_size > 10_000


@pytest.mark.slow
def test_bench_command_prints_ratios(capsys, monkeypatch):
    import calibkernels.bench as bench

    monkeypatch.setattr(bench, "CPU_SHAPES", [(256, 100)])
    main(["bench", "--device", "cpu", "--repeats", "2"])
    printed = capsys.readouterr().out
    assert "focal loss fwd+bwd 256x100" in printed and "x vs compile" in printed
    assert "ECE 256x100" in printed and "x vs torchmetrics" in printed
