"""The kernels to profile with Nsight Compute (the `profile` stage of bench/gpu_suite.sh): focal
loss forward (with its gradient) and backward (which exits at once for grad_output = 1) on both GPU
backends, and ECE, at one shape per class of row length — rows a warp, rows a block, a row a
block, a row a cluster — in bf16 and fp32, gamma = 3. Triton compiles on a small warm-up first, so
the profiled launches are the cases'. Arguments pick a part, so that a long profile can be split
over calls: dtypes (bf16, fp32) and shapes (65536x100, ...); none: every case."""

import sys

import torch

import calibkernels as ck

SHAPES = [(65536, 100), (65536, 1000), (8192, 32000), (8192, 128256)]


def case(n, c, dtype, backend, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(n, c, device="cuda", generator=g) * 2).to(dtype).requires_grad_()
    t = torch.randint(0, c, (n,), device="cuda", generator=g)
    torch.autograd.grad(ck.focal_loss(x, t, gamma=3.0, backend=backend), x)
    ck.ece(x.detach(), t, backend=backend)


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
picked = set(sys.argv[1:])
unknown = picked - set(DTYPES) - {f"{n}x{c}" for n, c in SHAPES}
if unknown:
    sys.exit(f"profile_case.py: unknown {sorted(unknown)}; dtypes {list(DTYPES)}, shapes "
             f"{[f'{n}x{c}' for n, c in SHAPES]}")
dtypes = [d for k, d in DTYPES.items() if k in picked] or list(DTYPES.values())
shapes = [s for s in SHAPES if f"{s[0]}x{s[1]}" in picked] or SHAPES
for dtype in dtypes:
    for n, c in shapes:
        for backend in ("cuda", "triton"):
            case(64, c, dtype, backend)  # compile and warm up
            torch.cuda.synchronize()
            print(f"profile {n}x{c} {dtype} {backend}", flush=True)
            case(n, c, dtype, backend)
            torch.cuda.synchronize()
print("profile cases done")
