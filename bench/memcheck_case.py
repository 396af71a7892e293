"""Small focal-loss and calibration cases for compute-sanitizer memcheck: every dtype, both GPU backends, rows
that are not a multiple of the vector width, ignored and out-of-range targets."""

import torch

import calibkernels as ck

for dtype in [torch.float32, torch.bfloat16, torch.float16, torch.float64]:
    for c in [1, 17, 1000, 5003]:
        x = torch.randn(37, c, device="cuda", dtype=dtype)
        t = torch.randint(0, c, (37,), device="cuda")
        t[3], t[5], t[7] = -100, c, -7  # ignored, and two out of range (NaN, never out of bounds)
        w = torch.rand(c, device="cuda", dtype=dtype)
        small = dtype in (torch.float32, torch.bfloat16)  # Triton JIT under the sanitizer is slow
        for op in (ck.ops.focal_loss, ck.ops.focal_loss_triton) if small else (ck.ops.focal_loss,):
            for reduction in ["none", "mean", "sum"]:
                op(x, t, None, [], [], 2.0, -100, 0.0, reduction, True)
                op(x, t, w, [0.2, 0.5], [5.0, 3.0], 2.0, -100, 0.1, reduction, True)
                op(x[:, : max(1, c - 1)].contiguous(), t.clamp(max=max(0, c - 2)), None, [], [],
                   0.5, -100, 0.0, reduction, False)
        print(dtype, c, flush=True)
        p = x.float().softmax(1).to(dtype)
        for backend in ("cuda", "triton") if small else ("cuda",):
            ck.calibration_bins(x, t, 15, classwise=c <= 1000, backend=backend)
            ck.calibration_bins(p, t.clamp(0, c - 1), 15, from_logits=False, classwise=c <= 1000,
                                backend=backend)
            ck.adaptive_ece(x, t, backend=backend)
torch.cuda.synchronize()
print("memcheck cases done")
