"""calibkernels.vocab_parallel_focal_loss over 2 and 4 gloo ranks, uneven class slices and ignored
targets: every rank gets the single-process loss, and its slice of the single-process gradient
(float64: 1e-12)."""

import itertools

import pytest
import torch
import torch.distributed as dist

import calibkernels as ck
from helpers import run_gloo_ranks

N, V = 40, 53
SLICES = {2: [0, 20, V], 4: [0, 7, 30, 31, V]}  # uneven; one rank of 4 holds a single class
CONFIGS = list(itertools.product([0.0, 3.0, "flsd-53"], [0.0, 0.1], ["mean", "sum", "none"]))


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, V, (N,), generator=g)
    x[::4, :] -= 10
    x[torch.arange(0, N, 4), t[::4]] += 30  # confident rows: the max on one rank only
    t[::6] = -100
    return x, t


def _rank(rank, world):
    x, t = _data()
    lo, hi = SLICES[world][rank], SLICES[world][rank + 1]
    results = []
    for gamma, eps, reduction in CONFIGS:
        local = x[:, lo:hi].clone().requires_grad_()
        loss = ck.vocab_parallel_focal_loss(local, t, gamma=gamma, label_smoothing=eps,
                                            reduction=reduction)
        go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        (grad,) = torch.autograd.grad(loss, local, go)
        results.append((loss.detach(), grad))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_gloo_ranks_equal_one_process(tmp_path, world):
    ranks = run_gloo_ranks(_rank, world, tmp_path)
    x, t = _data()
    for rank in range(world):
        lo, hi = SLICES[world][rank], SLICES[world][rank + 1]
        for (gamma, eps, reduction), (loss, grad) in zip(CONFIGS, ranks[rank]):
            xr = x.clone().requires_grad_()
            expected = ck.focal_loss(xr, t, gamma=gamma, label_smoothing=eps, reduction=reduction)
            go = torch.linspace(0.5, 1.5, expected.numel(), dtype=expected.dtype)
            (expected_grad,) = torch.autograd.grad(expected, xr, go.reshape(expected.shape))
            where = f"rank {rank}, gamma {gamma}, eps {eps}, {reduction}"
            torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-14, msg=where)
            torch.testing.assert_close(grad, expected_grad[:, lo:hi], rtol=1e-12, atol=1e-14,
                                       msg=where)


def _poisoned():
    """Rows a NaN or +inf poisons (F.cross_entropy's NaN), among clean ones: a window of rank 0
    holding only a NaN and -inf, a NaN target logit, a +inf beside the target; a window of only
    -inf with a finite target elsewhere stays finite."""
    x, t = _data()
    nan, inf = float("nan"), float("inf")
    x[1, 0], x[1, 1:20], t[1] = nan, -inf, 30
    x[2, t[2]] = nan
    x[3, (t[3] + 1) % V], t[3] = inf, 5
    x[5, 20:], t[5] = -inf, 3
    return x, t


def _poisoned_rank(rank, world):
    x, t = _poisoned()
    lo, hi = SLICES[world][rank], SLICES[world][rank + 1]
    results = []
    for gamma, eps in [(0.0, 0.0), (3.0, 0.1)]:
        local = x[:, lo:hi].clone().requires_grad_()
        loss = ck.vocab_parallel_focal_loss(local, t, gamma=gamma, label_smoothing=eps,
                                            reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), local)
        results.append((loss.detach(), grad))
    return results


@pytest.mark.slow
def test_gloo_ranks_poisoned_rows_are_nan_like_one_process(tmp_path):
    # a NaN that one rank's MAX all-reduce may drop must still reach every rank through the SUM
    ranks = run_gloo_ranks(_poisoned_rank, 2, tmp_path)
    x, t = _poisoned()
    for rank in range(2):
        lo, hi = SLICES[2][rank], SLICES[2][rank + 1]
        for (gamma, eps), (loss, grad) in zip([(0.0, 0.0), (3.0, 0.1)], ranks[rank]):
            xr = x.clone().requires_grad_()
            expected = ck.focal_loss(xr, t, gamma=gamma, label_smoothing=eps, reduction="none")
            (expected_grad,) = torch.autograd.grad(expected.sum(), xr)
            where = f"rank {rank}, gamma {gamma}, eps {eps}"
            torch_nan = torch.nn.functional.cross_entropy(x, t, reduction="none").isnan()
            assert torch.equal(expected.isnan(), torch_nan), where
            assert torch_nan[1:4].all() and not torch_nan[5], where
            torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-14,
                                       equal_nan=True, msg=where)
            torch.testing.assert_close(grad, expected_grad[:, lo:hi], rtol=1e-12, atol=1e-14,
                                       equal_nan=True, msg=where)


def test_without_a_process_group_it_says_what_to_use():
    with pytest.raises(RuntimeError, match="use calibkernels.focal_loss"):
        ck.vocab_parallel_focal_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


def test_phases_over_windows_equal_the_whole_row():
    # the phase ops on one process: split the classes into windows, combine by hand
    x, t = _data()
    table = torch.tensor([3.0], dtype=torch.float64)
    bounds = [0, 11, 12, 40, V]
    parts = [ck.ops.focal_loss_partial_stats(x[:, a:b], t, a, -100)
             for a, b in zip(bounds, bounds[1:])]
    top = torch.stack([p[:, 0] for p in parts]).amax(0)
    x_y = torch.stack([p[:, 3] for p in parts]).amax(0)
    n_max = sum(torch.where(p[:, 0] == top, p[:, 1], 0.0) for p in parts)
    rest = sum(torch.where(p[:, 0] == top, p[:, 2], (p[:, 1] + p[:, 2]) * (p[:, 0] - top).exp())
               for p in parts)
    row = torch.stack([top, n_max, rest, x_y], 1)
    sums = sum(ck.ops.focal_loss_partial_sums(x[:, a:b], t, table, row, a, V, -100, 0.1)
               for a, b in zip(bounds, bounds[1:]))
    loss, stats = ck.ops.focal_loss_finish(row, sums, t, table, V, -100, 0.1, "sum")
    xr = x.clone().requires_grad_()
    expected = ck.focal_loss(xr, t, gamma=3.0, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=0)
    (expected_grad,) = torch.autograd.grad(expected, xr)
    go = torch.tensor(1.0, dtype=torch.float64)
    grad = torch.cat([ck.ops.focal_loss_window_grad(go, x[:, a:b], t, stats, a, V, -100, 0.1,
                                                    "sum") for a, b in zip(bounds, bounds[1:])],
                     1)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gpu_phases_equal_the_cpus(dtype):
    x, t = _data()
    x = x.to(dtype)
    table = ck.NAMED_SCHEDULES["flsd-53"].table
    for a, b in [(0, V), (11, 40)]:
        cpu = ck.ops.focal_loss_partial_stats(x[:, a:b], t, a, -100)
        gpu = ck.ops.focal_loss_partial_stats(x[:, a:b].cuda(), t.cuda(), a, -100)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=0)
    row = ck.ops.focal_loss_partial_stats(x, t, 0, -100)
    sums = ck.ops.focal_loss_partial_sums(x, t, table, row, 0, V, -100, 0.1)
    torch.testing.assert_close(
        ck.ops.focal_loss_partial_sums(x.cuda(), t.cuda(), table, row.cuda(), 0, V, -100,
                                       0.1).cpu(), sums, rtol=1e-5, atol=1e-7)
    for reduction in ["none", "mean"]:
        loss, stats = ck.ops.focal_loss_finish(row, sums, t, table, V, -100, 0.1, reduction)
        g_loss, g_stats = ck.ops.focal_loss_finish(row.cuda(), sums.cuda(), t.cuda(), table, V,
                                                   -100, 0.1, reduction)
        torch.testing.assert_close(g_loss.cpu(), loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g_stats.cpu(), stats, rtol=1e-6, atol=1e-7)
        go = torch.rand(N, dtype=dtype) if reduction == "none" else torch.tensor(0.5, dtype=dtype)
        grad = ck.ops.focal_loss_window_grad(go, x[:, 11:40], t, stats, 11, V, -100, 0.1,
                                             reduction)
        g_grad = ck.ops.focal_loss_window_grad(go.cuda(), x[:, 11:40].cuda(), t.cuda(),
                                               g_stats, 11, V, -100, 0.1, reduction)
        torch.testing.assert_close(g_grad.cpu(), grad, rtol=1e-5, atol=1e-7)
    # a CPU tensor beside CUDA ones would be a host pointer in the kernel: an error instead
    with pytest.raises(ValueError, match="must be on row_stats' device"):
        ck.ops.focal_loss_finish(row.cuda(), sums.cuda(), t, table, V, -100, 0.1, "mean")
    with pytest.raises(ValueError, match="must be on the input's device"):
        ck.ops.focal_loss_partial_sums(x.cuda(), t.cuda(), table, row, 0, V, -100, 0.1)
    with pytest.raises(ValueError, match="must be on the input's device"):
        ck.ops.focal_loss_window_grad(go.cuda(), x[:, 11:40].cuda(), t.cuda(), stats, 11, V,
                                      -100, 0.1, "mean")


@pytest.mark.cuda
def test_nccl_single_rank_equals_focal_loss(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        x, t = _data()
        x, t = x.cuda().requires_grad_(), t.cuda()
        loss = ck.vocab_parallel_focal_loss(x, t, gamma="flsd-53", label_smoothing=0.1)
        (grad,) = torch.autograd.grad(loss, x)
        xr = x.detach().clone().requires_grad_()
        expected = ck.focal_loss(xr, t, gamma="flsd-53", label_smoothing=0.1)
        (expected_grad,) = torch.autograd.grad(expected, xr)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)
    finally:
        dist.destroy_process_group()
