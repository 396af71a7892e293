"""Per-call cost of calibkernels.focal_loss at CIFAR-sized batches on the CPU, forward + backward,
against F.cross_entropy: where the work is microseconds, the host path is the cost.

    .venv/bin/python bench/focal_loss_per_call.py [--rounds 30] [--calls 200]

The two are timed in alternation, round after round (each round `calls` forward + backward calls
of one, then of the other, on a leaf of the given shape, as a training step's loss.backward());
the ratio is the median over rounds of focal loss's time over F.cross_entropy's, and the
microseconds are each one's median per call.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import calibkernels as ck

SHAPES = [(128, 10), (128, 100)]


def per_call(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"{args.rounds} alternating rounds of {args.calls} calls")
    for n, c in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, generator=g).requires_grad_()
        t = torch.randint(0, c, (n,), generator=g)
        impls = {"focal_loss (gamma=3)": lambda: ck.focal_loss(x, t).backward(),
                 "F.cross_entropy": lambda: F.cross_entropy(x, t).backward()}
        for fn in impls.values():
            per_call(fn, args.calls)  # warm-up
        times = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, fn in impls.items():
                times[name].append(per_call(fn, args.calls))
        (a, ta), (b, tb) = times.items()
        ratio = statistics.median(p / q for p, q in zip(ta, tb))
        print(f"{n} x {c}: {a} {1e6 * statistics.median(ta):.1f} us, "
              f"{b} {1e6 * statistics.median(tb):.1f} us per forward + backward; "
              f"ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
