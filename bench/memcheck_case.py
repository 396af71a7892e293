"""Small focal-loss and calibration cases for compute-sanitizer memcheck: every dtype, both GPU
backends, rows that are not a multiple of the vector width, ignored and out-of-range targets,
probability targets, a gamma table on the device, the statistics-only forward (a traced graph's)
and each backward phase; the vocabulary-window phases, scale_unless_one_, the calibration report
and sweep, and the fused linear + focal loss; first the CUDA class-index fast path at each of its
layouts and the calibration kernels' ticket (alone with the argument `sparse`)."""

import sys

import torch

import calibkernels as ck


def sparse_cases():
    """The CUDA class-index fast path at each of its layouts (rows a warp, rows a block, a row a
    block, a row a cluster of 2, 4, 8 CTAs), rows that start 16-byte aligned and rows that share
    their first and last chunks with their neighbours (an odd C, an odd N: the tensor's last chunk
    ends past it); then the calibration rows and top kernels (the last block's ticket), the
    classwise kernel with its bins in shared memory and in the partials, and the sweep. Also run
    under racecheck and synccheck (`python bench/memcheck_case.py sparse`)."""
    op = torch.ops.calibkernels.focal_loss_forward
    for dtype in [torch.float32, torch.bfloat16]:
        vec = 16 // torch.tensor([], dtype=dtype).element_size()
        for chunks in [1, 5, 33, 129, 1025, 2049, 4097, 8193, 16385]:
            for c in [chunks * vec, (chunks - 1) * vec + 1]:
                x = torch.randn(5, c, device="cuda", dtype=dtype)
                t = torch.randint(0, c, (5,), device="cuda")
                t[1], t[3] = -100, c  # ignored, out of range
                w = torch.rand(c, device="cuda", dtype=dtype)
                for reduction in ["none", "mean"]:  # with the gradient, then statistics only
                    for grad in (True, False):
                        op(x, t, w, torch.tensor([3.0], dtype=torch.float64), -100, 0.0,
                           reduction, grad, compute_stats=True)
        print("sparse", dtype, flush=True)
    for c in [10, 1000, 5003]:
        x = torch.randn(3000, c, device="cuda")  # 3 blocks of the top kernel
        t = torch.randint(0, c, (3000,), device="cuda")
        t[5] = -100
        ck.calibration_bins(x, t, 15, backend="cuda")
        ck.calibration_bins(x, t, 15, from_logits=None, backend="cuda")
        # classwise bins in shared memory (96) and in the partials (97 and up); 2 chunks and 1
        for n_bins in (96, 97, 300) if c <= 1000 else ():
            ck.calibration_bins(x, t, n_bins, classwise=True, backend="cuda")
            ck.calibration_bins(x[:500], t[:500], n_bins, classwise=True, backend="cuda")
        # the sweep's warp-private staging at each lane split (1, 2, 4, 8 sums a lane)
        for k in (3, 40, 100, 256):
            for dtype in (torch.float32, torch.bfloat16):
                ck.calibration_sweep(x[:37].to(dtype), t[:37], torch.linspace(0.1, 10, k),
                                     backend="cuda")
        # its binning: 2 chunks (the second's quarters full, short and empty), 2 blocks of
        # temperatures (the second 8 wide), 3 tiles of bins (a block each)
        if c == 10:
            ck.calibration_sweep(x, t, torch.linspace(0.1, 10, 40), 45, backend="cuda")
    print("calibration", flush=True)


sparse_cases()
if sys.argv[1:] == ["sparse"]:
    sys.exit(0)
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
                    fwd(x, target, weight, table, -100, eps, reduction, False, compute_stats=True)
                    bwd(go, x, target, weight, table, stats, -100, eps, reduction)
                    # grad_output in the input's dtype, expanded: read in place (stride 0)
                    bwd(go.to(dtype).reshape(-1)[:1].expand(go.numel()).reshape(go.shape), x,
                        target, weight, table, stats, -100, eps, reduction)
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
        # the phases over windows of the classes (one window is a rank's slice), odd widths
        ops = torch.ops.calibkernels
        tw = torch.where((t >= 0) & (t < c), t, -100)
        for a, b in [(0, c), (0, (c + 1) // 2), ((c + 1) // 2, c)]:
            if a == b:
                continue
            win = x[:, a:b].contiguous()
            row = ops.focal_loss_partial_stats(win, tw, a, -100)
            sums = ops.focal_loss_partial_sums(win, tw, flsd, row, a, c, -100, 0.1)
            for reduction in ["none", "mean"]:
                loss, stats = ops.focal_loss_finish(row, sums, tw, flsd, c, -100, 0.1, reduction)
                go = torch.rand(loss.shape, device="cuda", dtype=loss.dtype)
                ops.focal_loss_window_grad(go, win, tw, stats, a, c, -100, 0.1, reduction)
        for scale in [1.0, 0.5]:
            ops.scale_unless_one_(x.clone(), torch.tensor(scale, device="cuda", dtype=dtype))
        if small:
            ck.calibration_report(x, t.clamp(0, c - 1))
            ck.calibration_sweep(x, t.clamp(0, c - 1), [0.5, 1.0, 2.0])
            h = torch.randn(37, 16, device="cuda", dtype=dtype, requires_grad=True)
            wt = torch.randn(c, 16, device="cuda", dtype=dtype, requires_grad=True)
            for backend in ("cuda", "triton"):
                for reduction in ["mean", "none"]:
                    loss = ck.linear_focal_loss(h, wt, t.clamp(0, c - 1), reduction=reduction,
                                                chunk_size=8, backend=backend)
                    loss.sum().backward()
torch.cuda.synchronize()
print("memcheck cases done")
