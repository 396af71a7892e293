"""The kernels to profile with Nsight Compute (the `profile` stage of bench/gpu_suite.sh): focal
loss forward (with its gradient) and backward (which exits at once for grad_output = 1) on both GPU
backends, and ECE, at one shape per class of row length — rows a warp, rows a block, a row a
block, a row a cluster — in bf16 and fp32, gamma = 3. Triton compiles on a small warm-up first, so
the profiled launches are the cases'."""

import torch

import calibkernels as ck

SHAPES = [(65536, 100), (65536, 1000), (8192, 32000), (8192, 128256)]


def case(n, c, dtype, backend, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(n, c, device="cuda", generator=g) * 2).to(dtype).requires_grad_()
    t = torch.randint(0, c, (n,), device="cuda", generator=g)
    torch.autograd.grad(ck.focal_loss(x, t, gamma=3.0, backend=backend), x)
    ck.ece(x.detach(), t, backend=backend)


for dtype in (torch.bfloat16, torch.float32):
    for n, c in SHAPES:
        for backend in ("cuda", "triton"):
            case(64, c, dtype, backend)  # compile and warm up
            torch.cuda.synchronize()
            print(f"profile {n}x{c} {dtype} {backend}", flush=True)
            case(n, c, dtype, backend)
            torch.cuda.synchronize()
print("profile cases done")
