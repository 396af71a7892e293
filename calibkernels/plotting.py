"""Reliability diagrams with matplotlib (imported only when a diagram is drawn). Each diagram is
drawn on a Figure of its own: pyplot's state and the process's backend are never touched, and
nothing stays open when the figure is dropped (a diagram per epoch does not leak)."""

import torch

from ._optional import require
from .calibration import binned_error, reliability_table


def _matplotlib():
    return require("matplotlib.figure", "plot", "calibkernels.reliability_diagram").Figure


def reliability_diagram(logits_or_probs=None, target=None, n_bins=15, from_logits=None,
                        ignore_index=-100, *, table=None, title=None, path=None, ax=None):
    """A matplotlib Figure: accuracy bars per bin, their gap to the diagonal, and the histogram of
    samples per bin below; the ECE in the title. Pass logits or probabilities and targets, or a
    table from reliability_table() / CalibrationMeter.table(). Saved as PNG when path is given.
    With ax= (a matplotlib Axes) the bars are drawn there, without the histogram, and ax's
    figure is returned."""
    Figure = _matplotlib()
    if table is None:
        if logits_or_probs is None or target is None:
            raise ValueError("reliability_diagram: pass logits_or_probs and target, or table=")
        table = reliability_table(logits_or_probs, target, n_bins, from_logits, ignore_index)
    t = {k: v.detach().cpu().double() for k, v in table.items()}
    counts = t["count"]
    # empty bins hold NaN and weigh nothing; a NaN in a filled bin makes the ECE NaN, as ck.ece
    filled_bins = counts > 0
    hits = torch.where(filled_bins, t["accuracy"] * counts, 0.0)
    conf_sums = torch.where(filled_bins, t["confidence"] * counts, 0.0)
    ece_value = float(binned_error(counts.long(), conf_sums, hits, "l1"))
    lower, upper = t["lower"].numpy(), t["upper"].numpy()
    width, centers = upper - lower, (lower + upper) / 2
    filled = (counts > 0).numpy()
    acc, conf = t["accuracy"].numpy(), t["confidence"].numpy()

    if ax is None:
        fig = Figure(figsize=(5, 6.2))
        ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig, hist = ax.figure, None
    ax.bar(centers[filled], acc[filled], width[filled], color="#4878d0", edgecolor="black",
           linewidth=0.6, label="accuracy")
    gap_bottom = [min(a, c) for a, c in zip(acc[filled], conf[filled])]
    gap_height = [abs(a - c) for a, c in zip(acc[filled], conf[filled])]
    ax.bar(centers[filled], gap_height, width[filled], bottom=gap_bottom, color="#ee854a",
           alpha=0.55, edgecolor="#c44e52", hatch="//", linewidth=0.6, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title((f"{title}\n" if title else "") + f"ECE = {100 * ece_value:.2f}%  "
                 f"({int(counts.sum())} samples, {len(counts)} bins)")
    if hist is not None:
        hist.bar(centers, counts.numpy(), width, color="#6acc64", edgecolor="black",
                 linewidth=0.6)
        positive = counts[counts > 0]
        spread = positive.numel() and counts.max() > 50 * max(1.0, float(positive.min()))
        hist.set_yscale("log" if spread else "linear")
        hist.set_xlabel("confidence")
        hist.set_ylabel("samples")
        fig.tight_layout()
    else:
        ax.set_xlabel("confidence")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
