"""The main job: the paper's experiment in miniature, on scikit-learn's bundled digits data.

A small MLP is trained with cross-entropy, FL-3 and FLSD-53 through the fused ops (no weight
decay, long enough for cross-entropy's test NLL to overfit), then evaluated as in the paper: test
error, ECE, AdaECE and classwise ECE (15 bins), before and after temperature scaling with T fitted
on the validation split. No download: `load_digits` ships inside scikit-learn.
"""

import json
import os

import torch
from torch import nn

from ._optional import require
from .calibration import adaptive_ece, classwise_ece, ece
from .focal_loss import FocalLoss, focal_loss
from .temperature import fit_temperature

LOSSES = {"CE": 0.0, "FL-3": 3.0, "FLSD-53": "flsd-53"}


def load_digits_split(seed=0, device="cpu"):
    """Standardised digits (1797 x 64, 10 classes), split 60 / 20 / 20 into train / val / test."""
    data = require("sklearn.datasets", "demo", "the demo").load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
    mean, std = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    parts = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val),
             "test": slice(n_train + n_val, None)}
    return {k: (x[s].to(device), y[s].to(device)) for k, s in parts.items()}


def make_mlp(n_in=64, n_hidden=256, n_classes=10):
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_classes))


def train(model, loss_fn, train_xy, eval_xy, *, epochs=300, batch_size=64, lr=1e-3, seed=0,
          desc="train"):
    """Adam, no weight decay. Yields (epoch, mean train loss, held-out NLL, held-out accuracy)."""
    x, y = train_xy
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    tqdm = require("tqdm", "demo", "the demo").tqdm
    # disable=None: a progress bar on a terminal, none in a piped log (whole lines only there)
    for epoch in tqdm(range(1, epochs + 1), desc=desc, unit="epoch", leave=False, disable=None):
        model.train()
        total = torch.zeros((), device=x.device)
        for idx in torch.randperm(len(y), generator=g).to(x.device).split(batch_size):
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        model.eval()
        with torch.no_grad():
            logits = model(eval_xy[0])
            nll = focal_loss(logits, eval_xy[1], gamma=0.0)  # the fused op at gamma = 0 is the NLL
            acc = (logits.argmax(1) == eval_xy[1]).float().mean()
        yield epoch, (total / len(y)).item(), nll.item(), acc.item()


def metrics(logits, y):
    """The paper's table row, in percent."""
    return {"test_error": 100 * (logits.argmax(1) != y).float().mean().item(),
            "ece": 100 * ece(logits, y).item(),
            "adaece": 100 * adaptive_ece(logits, y).item(),
            "classwise_ece": 100 * classwise_ece(logits, y).item()}


def run(epochs=300, seed=0, device="cpu", out="out/demo", json_path=None,
        temperature_criterion="ece"):
    os.makedirs(out, exist_ok=True)
    data = load_digits_split(seed, device)
    x_val, y_val = data["val"]
    x_test, y_test = data["test"]
    print(f"digits: {len(data['train'][1])} train / {len(y_val)} validation / {len(y_test)} test "
          f"samples, {epochs} epochs per loss on {device}; T fitted on validation "
          f"(criterion={temperature_criterion!r})")
    results = {}
    for name, gamma in LOSSES.items():
        torch.manual_seed(seed)
        model = make_mlp().to(device)
        nlls = []
        for epoch, loss, nll, acc in train(model, FocalLoss(gamma=gamma), data["train"],
                                           data["test"], epochs=epochs, seed=seed, desc=name):
            nlls.append(nll)
            if epoch % max(1, epochs // 5) == 0 or epoch == epochs:
                require("tqdm", "demo", "the demo").tqdm.write(
                    f"{name:8s} epoch {epoch:4d}  train loss {loss:.4f}  test NLL {nll:.4f}  "
                    f"test accuracy {100 * acc:.2f}%")
        with torch.no_grad():
            val_logits, test_logits = model(x_val), model(x_test)
        t = fit_temperature(val_logits, y_val, temperature_criterion)
        before, after = metrics(test_logits, y_test), metrics(test_logits / t, y_test)
        results[name] = {**{k: round(v, 2) for k, v in before.items()}, "temperature": t,
                         **{f"{k}_after_t": round(v, 2) for k, v in after.items()
                            if k != "test_error"},
                         "test_nll_per_epoch": [round(v, 5) for v in nlls]}
        from .plotting import reliability_diagram

        reliability_diagram(test_logits, y_test, title=f"{name}, digits test set",
                            path=os.path.join(out, f"reliability_{name}.png"))
    _plot_nll(results, os.path.join(out, "test_nll.png"))
    print(table(results))
    print(f"reliability diagrams and test_nll.png written to {out}/")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"losses": results}, f, indent=1)
        print(f"numbers written to {json_path}")
    return results


def table(results):
    """The paper's table: each metric before temperature scaling, then after it, with T."""
    lines = ["", f"{'loss':9s} {'test error %':>12s} {'ECE %':>14s} {'AdaECE %':>14s} "
             f"{'classwise ECE %':>16s}   (after temperature scaling, T)"]
    for name, r in results.items():
        lines.append(
            f"{name:9s} {r['test_error']:12.2f} {r['ece']:6.2f} ({r['ece_after_t']:5.2f}) "
            f"{r['adaece']:6.2f} ({r['adaece_after_t']:5.2f}) {r['classwise_ece']:7.2f} "
            f"({r['classwise_ece_after_t']:5.2f})   T = {r['temperature']:g}")
    return "\n".join(lines)


def _plot_nll(results, path):
    """Test NLL against epochs for each loss (the paper's Fig. 3), on a Figure of its own."""
    Figure = require("matplotlib.figure", "demo", "the demo's plots").Figure
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, r in results.items():
        nll = r["test_nll_per_epoch"]
        ax.plot(range(1, len(nll) + 1), nll, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test NLL")
    ax.set_yscale("log")
    ax.set_title("Test NLL during training (digits, no weight decay)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
