"""The main job (`make demo`) trains and reports."""

import re

from calibkernels.__main__ import main


def test_demo_trains_and_prints_each_epoch(capsys):
    main(["demo", "--epochs", "6", "--device", "cpu"])
    out = capsys.readouterr().out
    epochs = re.findall(r"epoch +(\d+) +train loss ([\d.]+) +held-out accuracy ([\d.]+)%", out)
    assert [int(e[0]) for e in epochs] == list(range(1, 7))
    losses = [float(e[1]) for e in epochs]
    assert losses[-1] < losses[0]
    assert float(epochs[-1][2]) > 85.0  # a 64-128-10 MLP reaches ~96 % on digits
