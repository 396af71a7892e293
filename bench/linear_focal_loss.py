"""The fused linear + focal loss (calibkernels.linear_focal_loss) against the eager path
(logits = hidden @ weight.T, then the eager focal loss): forward + backward time, and peak memory
above the inputs, each measured in a process of its own.

    .venv/bin/python bench/linear_focal_loss.py [--n 8192] [--h 256] [--v 32000] [--rounds 3]

Defaults: the shape of CONTRACT §6's memory check on the CPU (float32, gamma = 3). On a GPU
(--device cuda) the LLM shape is 8192 tokens, H = 4096, V = 128256, bfloat16.
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
dtype = getattr(torch, dtype)
g = torch.Generator().manual_seed(0)
hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
weight = (torch.randn(v, h, generator=g) / h ** 0.5 * 3).to(device, dtype).requires_grad_()
target = torch.randint(0, v, (n,), generator=g).to(device)
def step():
    if path == "eager":
        loss = reference.focal_loss(hidden @ weight.T, target, gamma=3.0)
    else:
        loss = ck.linear_focal_loss(hidden, weight, target, gamma=3.0)
    loss.backward()
    hidden.grad = weight.grad = None
def peak():
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
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
    args = ap.parse_args()
    results = {}
    for path in ["eager", "linear_focal_loss"]:
        done = subprocess.run([sys.executable, "-c", PROBE, path, str(args.n), str(args.h),
                               str(args.v), args.device, args.dtype, str(args.rounds)],
                              capture_output=True, text=True, check=True)
        results[path] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"N = {args.n}, H = {args.h}, V = {args.v}, {args.dtype} on {args.device}, "
          f"forward + backward, gamma = 3, {args.rounds} rounds each (median):")
    for path, r in results.items():
        print(f"  {path:18s} {statistics.median(r['ms']):9.1f} ms   peak memory above the inputs "
              f"{r['extra_mib']:8.1f} MiB")
    e, f = results["eager"], results["linear_focal_loss"]
    print(f"  the fused path: {statistics.median(e['ms']) / statistics.median(f['ms']):.2f}x the "
          f"eager path's speed, {f['extra_mib'] / e['extra_mib']:.3f} of its memory")


if __name__ == "__main__":
    main()
