"""The temperature sweep (calibkernels.calibration_sweep: ECE and NLL at K temperatures from one
read of the logits) against the paper's procedure: its ECELoss evaluated at each of the 100
temperatures T in {0.1, ..., 10.0}, one pass over the logits each.

    .venv/bin/python bench/calibration_sweep.py [--device cpu] [--rounds 5] [--backend auto]

The paper's ECELoss is written here from its semantics (softmax of logits / T, confidence and
prediction, then one mask per bin with .item() bounds, as in torrvision/focal_calibration's
Metrics/metrics.py); the ECE alone, without the NLL the sweep also gives. The two are timed in
alternation; the ratio is the median over rounds.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import calibkernels as ck

SHAPES = [(65536, 100), (10000, 1000)]
GRID = [i / 10 for i in range(1, 101)]


def paper_ece_loss(logits, labels, n_bins=15):
    """The paper's ECELoss.forward: float32 softmax, a mask per (lower, upper] bin."""
    softmaxes = F.softmax(logits, dim=1)
    confidences, predictions = torch.max(softmaxes, 1)
    accuracies = predictions.eq(labels)
    bounds = torch.linspace(0, 1, n_bins + 1)
    ece = torch.zeros(1, device=logits.device)
    for lower, upper in zip(bounds[:-1], bounds[1:]):
        in_bin = confidences.gt(lower.item()) * confidences.le(upper.item())
        prop_in_bin = in_bin.float().mean()
        if prop_in_bin.item() > 0:
            accuracy_in_bin = accuracies[in_bin].float().mean()
            avg_confidence_in_bin = confidences[in_bin].mean()
            ece += torch.abs(avg_confidence_in_bin - accuracy_in_bin) * prop_in_bin
    return ece


def paper_procedure(logits, labels):
    return [paper_ece_loss(logits / t, labels).item() for t in GRID]


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--backend", default="auto", choices=["auto", "cpu", "cuda", "triton"],
                    help="calibration_sweep's backend")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"{device}, float32, {len(GRID)} temperatures, {args.rounds} alternating rounds, "
          f"{torch.get_num_threads()} threads, backend {args.backend}")
    for n, c in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(n, c, generator=g) * 3).to(device)
        t = torch.randint(0, c, (n,), generator=g).to(device)
        impls = {"calibration_sweep": lambda: ck.calibration_sweep(x, t, GRID, backend=args.backend)["ece"].tolist(),
                 "paper's ECELoss x 100": lambda: paper_procedure(x, t)}
        results = {name: fn() for name, fn in impls.items()}  # warm-up, and the values
        worst = max(abs(a - b) for a, b in zip(*results.values()))
        times = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, fn in impls.items():
                times[name].append(timed(fn, device)[0])
        (a, ta), (b, tb) = times.items()
        ratio = statistics.median(q / p for p, q in zip(ta, tb))
        print(f"{n} x {c}: {a} {1e3 * statistics.median(ta):.1f} ms, {b} "
              f"{1e3 * statistics.median(tb):.1f} ms: {ratio:.1f}x faster; largest ECE "
              f"difference {worst:.1e}")


if __name__ == "__main__":
    main()
