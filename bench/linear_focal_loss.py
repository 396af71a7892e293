"""The fused linear + focal loss (calibkernels.linear_focal_loss) against the eager path
(logits = hidden @ weight.T, then the eager focal loss): forward + backward time, and peak memory
above the inputs, each measured in a process of its own.

    .venv/bin/python bench/linear_focal_loss.py [--n 8192] [--h 256] [--v 32000] [--rounds 3]
    .venv/bin/python bench/linear_focal_loss.py --device cuda --dtype bfloat16 --gamma 0 \
        --h 4096 --v 128256 --paths eager,compile,linear_focal_loss,liger --rounds 10

Defaults: the shape of CONTRACT §6's memory check on the CPU (float32, gamma = 3, eager and fused).
On a GPU the LLM comparison of issue 15 is the second line: gamma = 0 so that Liger-Kernel's fused
linear cross entropy (path "liger", when liger_kernel is installed) computes the same loss; "compile"
is torch.compile of the eager path. On CUDA one untimed warm-up call precedes the rounds (JIT).
"""

import argparse
import json
import statistics
import subprocess
import sys

PROBE = """
import json, resource, sys, time, torch
import calibkernels as ck
from calibkernels import reference
path, n, h, v, device, dtype, rounds = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5], sys.argv[6], int(sys.argv[7])
gamma = float(sys.argv[8])
dtype = getattr(torch, dtype)
g = torch.Generator().manual_seed(0)
hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
weight = (torch.randn(v, h, generator=g) / h ** 0.5 * 3).to(device, dtype).requires_grad_()
target = torch.randint(0, v, (n,), generator=g).to(device)
def eager(hidden, weight, target):
    return reference.focal_loss(hidden @ weight.T, target, gamma=gamma)
if path == "liger":
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    liger = LigerFusedLinearCrossEntropyLoss()
loss_fn = {"eager": eager, "compile": torch.compile(eager) if path == "compile" else None,
           "linear_focal_loss": lambda h, w, t: ck.linear_focal_loss(h, w, t, gamma=gamma),
           "liger": lambda h, w, t: liger(w, h, t)}[path]
def step():
    loss_fn(hidden, weight, target).backward()
    hidden.grad = weight.grad = None
def peak():
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if device == "cuda":
    step(); torch.cuda.synchronize()  # warm-up: Triton and torch.compile compile here
    # the peak from here on, above what stays allocated between steps (the inputs)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 2**20
else:
    base = peak()
times = []
for _ in range(rounds):
    if device == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter(); step()
    if device == "cuda": torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
print(json.dumps({"ms": [1e3 * t for t in times], "extra_mib": peak() - base}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--h", type=int, default=256)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gamma", type=float, default=3.0)
    ap.add_argument("--paths", default="eager,linear_focal_loss",
                    help="comma-separated: eager, compile, linear_focal_loss, liger")
    args = ap.parse_args()
    if args.gamma != 0 and "liger" in args.paths:
        ap.error("liger computes cross entropy: compare it at --gamma 0")
    results = {}
    for path in args.paths.split(","):
        done = subprocess.run([sys.executable, "-c", PROBE, path, str(args.n), str(args.h),
                               str(args.v), args.device, args.dtype, str(args.rounds),
                               str(args.gamma)], capture_output=True, text=True)
        if done.returncode != 0:  # e.g. out of memory, or liger_kernel not installed
            print(f"  {path}: failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        results[path] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"N = {args.n}, H = {args.h}, V = {args.v}, {args.dtype} on {args.device}, "
          f"forward + backward, gamma = {args.gamma:g}, {args.rounds} rounds each (median):")
    for path, r in results.items():
        print(f"  {path:18s} {statistics.median(r['ms']):9.1f} ms   peak memory above the inputs "
              f"{r['extra_mib']:8.1f} MiB")
    f = results.get("linear_focal_loss")
    for path, r in results.items():
        if f is not None and path != "linear_focal_loss":
            print(f"  linear_focal_loss against {path}: "
                  f"{statistics.median(r['ms']) / statistics.median(f['ms']):.2f}x its speed, "
                  + (f"{f['extra_mib'] / r['extra_mib']:.3f} of its memory" if r["extra_mib"] > 0
                     else "its memory not measured"))


if __name__ == "__main__":
    main()
