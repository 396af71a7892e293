"""Where the CPU focal loss's time goes at one shape: the forward with and without the gradient
(and with the row statistics alone, a compiled step's forward), the gradient phase a backward with
grad_output != 1 (or a compiled step) runs, a same-size copy; the ops of a training step, eager and
compiled; and what first-touching a fresh buffer costs on this machine (page faults).

    .venv/bin/python bench/cpu_focal_loss_parts.py [--n 8192] [--c 1000] [--repeats 200]

Each line is the min and median over the repeats, each group's variants timed in alternation.
"""

import argparse
import mmap
import statistics
import time

import numpy as np
import torch

import calibkernels  # noqa: F401  (registers the ops)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--c", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.c, generator=g) * 2
    t = torch.randint(0, args.c, (args.n,), generator=g)
    op = torch.ops.calibkernels.focal_loss_forward
    backward = torch.ops.calibkernels.focal_loss_backward
    gamma = torch.tensor([3.0], dtype=torch.float64)
    _, _, stats = op(x, t, None, gamma, -100, 0.0, "mean", True)
    go = torch.tensor(2.0)
    out = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()

    def first_touch():  # a fresh anonymous mapping, written once: one fault per page
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        np.frombuffer(m, dtype=np.uint8).fill(1)
        m.close()

    def traced_step(compute_grad):  # the ops of a compiled step's forward and backward graphs
        _, _, st = op(x, t, None, gamma, -100, 0.0, "mean", compute_grad, compute_stats=True)
        return backward(one, x, t, None, gamma, st, -100, 0.0, "mean")

    one = torch.tensor(1.0)
    groups = [{  # the kernel against a copy, then (apart: it evicts caches) the page-fault cost
        "forward with gradient": lambda: op(x, t, None, gamma, -100, 0.0, "mean", True),
        "forward, loss only": lambda: op(x, t, None, gamma, -100, 0.0, "mean", False),
        "forward, statistics only (compiled)":
            lambda: op(x, t, None, gamma, -100, 0.0, "mean", False, compute_stats=True),
        "gradient phase (grad_output != 1)":
            lambda: backward(go, x, t, None, gamma, stats, -100, 0.0, "mean"),
        "copy into an existing tensor": lambda: out.copy_(x),
    }, {  # a training step at grad_output 1: eager hands out the forward's gradient
        "eager step (forward with gradient)":
            lambda: op(x, t, None, gamma, -100, 0.0, "mean", True),
        "compiled step (statistics, gradient phase)": lambda: traced_step(False),
        "compiled step before 8afb522 (+ gradient)": lambda: traced_step(True),
    }, {
        "first touch of a fresh buffer (1 thread)": first_touch,
        "rewrite of a touched buffer (1 thread)":
            lambda: np.frombuffer(out.numpy(), dtype=np.uint8).fill(1),
    }]
    print(f"{args.n} x {args.c} float32, {torch.get_num_threads()} threads, "
          f"{nbytes / 2**20:.1f} MiB")
    for variants in groups:
        times = {name: [] for name in variants}
        for fn in variants.values():
            fn()
        for _ in range(args.repeats):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(1e3 * (time.perf_counter() - t0))
        for name, ts in times.items():
            print(f"{name:42s} min {min(ts):7.2f} ms   median {statistics.median(ts):7.2f} ms")


if __name__ == "__main__":
    main()
