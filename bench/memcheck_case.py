"""Small focal-loss and calibration cases for compute-sanitizer memcheck: every dtype, both GPU
backends, rows that are not a multiple of the vector width, ignored and out-of-range targets,
probability targets, a gamma table on the device, and each backward phase."""

import torch

import calibkernels as ck

ck.ops.load_triton()
OPS = {"cuda": ("focal_loss_forward", "focal_loss_backward", "focal_loss_backward_"),
       "triton": ("focal_loss_forward_triton", "focal_loss_backward_triton",
                  "focal_loss_backward_triton_")}
fixed = torch.tensor([2.0], dtype=torch.float64)
flsd = ck.NAMED_SCHEDULES["flsd-532"].table
for dtype in [torch.float32, torch.bfloat16, torch.float16, torch.float64]:
    for c in [1, 17, 1000, 5003]:
        x = torch.randn(37, c, device="cuda", dtype=dtype)
        t = torch.randint(0, c, (37,), device="cuda")
        t[3], t[5], t[7] = -100, c, -7  # ignored, and two out of range (NaN, never out of bounds)
        p = torch.rand(37, c, device="cuda").softmax(1)
        w = torch.rand(c, device="cuda", dtype=dtype)
        small = dtype in (torch.float32, torch.bfloat16)  # Triton JIT under the sanitizer is slow
        for backend in ("cuda", "triton") if small else ("cuda",):
            fwd, bwd, bwd_ = (getattr(torch.ops.calibkernels, name) for name in OPS[backend])
            for reduction in ["none", "mean", "sum"]:
                go = torch.rand(37 if reduction == "none" else (), device="cuda")
                for target, weight, table, eps in [(t, None, fixed, 0.0), (t, w, flsd, 0.1),
                                                   (p, w, flsd.cuda(), 0.1),
                                                   (p.to(dtype), None, fixed.cuda(), 0.0)]:
                    _, grad, stats = fwd(x, target, weight, table, -100, eps, reduction, True)
                    bwd(go, x, target, weight, table, stats, -100, eps, reduction)
                    bwd_(grad, go, x, target, weight, table, stats, -100, eps, reduction)
                fwd(x[:, : max(1, c - 1)].contiguous(), t.clamp(max=max(0, c - 2)), None, fixed,
                    -100, 0.0, reduction, False)
        print(dtype, c, flush=True)
        probs = x.float().softmax(1).to(dtype)
        for backend in ("cuda", "triton") if small else ("cuda",):
            ck.calibration_bins(x, t, 15, classwise=c <= 1000, backend=backend)
            ck.calibration_bins(probs, t.clamp(0, c - 1), 15, from_logits=False,
                                classwise=c <= 1000, backend=backend)
            ck.adaptive_ece(x, t, backend=backend)
torch.cuda.synchronize()
print("memcheck cases done")
