"""The kernels to profile with Nsight Compute (the `profile` stage of bench/gpu_suite.sh): focal
loss (the forward with its gradient, and the backward, which exits at once for grad_output = 1) on
both GPU backends and ECE, at an LLM vocabulary, bf16 and fp32. Each case runs twice; the suite's
ncu filter profiles the second."""

import torch

import calibkernels as ck

N, C = 8192, 128256
for dtype in (torch.bfloat16, torch.float32):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(N, C, device="cuda", generator=g) * 2).to(dtype).requires_grad_()
    t = torch.randint(0, C, (N,), device="cuda", generator=g)
    for backend in ("cuda", "triton"):
        for _ in range(2):
            torch.autograd.grad(ck.focal_loss(x, t, gamma=3.0, backend=backend), x)
            ck.ece(x.detach(), t, backend=backend)
    torch.cuda.synchronize()
    del x
print("profile cases done")
