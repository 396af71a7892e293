"""Shared test inputs, the CONTRACT §4 tolerance rule, and a gloo process-group harness."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def make_logits(n, c, dtype=torch.float32, extra_dims=(), *, seed=0, confident=True,
                ignore_index=None, requires_grad=True, equal_row=True):
    """Random logits (N, C, *extra_dims) and targets, with confident rows (p_y >= 0.999),
    rows of all-equal logits and, optionally, ignored positions."""
    g = torch.Generator().manual_seed(seed)
    extra_dims = tuple(extra_dims)
    m = n * int(torch.tensor(extra_dims).prod()) if extra_dims else n
    rows = torch.randn(m, c, generator=g, dtype=torch.float64) * 2.0
    flat_t = torch.randint(0, c, (m,), generator=g)
    if confident and m >= 4:
        idx = torch.arange(0, m, 4)
        rows[idx, flat_t[idx]] += 20.0  # p_y >= 0.999 for every C used in the tests
    if equal_row and m >= 3:
        rows[m // 3] = 0.5  # all logits equal
    if ignore_index is not None and m >= 2:
        flat_t[torch.arange(1, m, 5)] = ignore_index
    x = rows.reshape((n,) + extra_dims + (c,)).movedim(-1, 1).contiguous()
    t = flat_t.reshape((n,) + extra_dims)
    x = x.to(dtype).requires_grad_(requires_grad)
    return x, t


def loss_and_grad(fn, x, t, gamma, reduction, **kw):
    """fn(x, t, gamma=gamma, ...) and its gradient in x for a non-trivial grad_output (which
    exercises the gradient phase of backward)."""
    x = x.detach().requires_grad_()
    loss = fn(x, t, gamma=gamma, reduction=reduction, **kw)
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)
    (grad,) = torch.autograd.grad(loss, x, go.reshape(loss.shape))
    return loss.detach(), grad


def rel_err(actual, expected):
    """Norm-wise relative error, max |a - e| / max |e| (0 / 0 counts as 0)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max() if expected.numel() else torch.tensor(0.0)
    diff = (actual - expected).abs().max() if expected.numel() else torch.tensor(0.0)
    return float(diff / scale) if scale > 0 else float(diff)


def assert_within_twice_eager(actual, eager, truth, dtype, what=""):
    """CONTRACT §4: our error against the float64 truth is at most twice eager PyTorch's in the
    same dtype, plus a floor of one rounding at the largest magnitude. Where eager gives NaN/Inf
    (its pow backward at p = 1 for gamma < 1), ours must still be finite and within that bound."""
    if truth.numel() == 0:
        return
    actual, eager, truth = actual.double(), eager.double(), truth.double()
    finite = torch.isfinite(truth)
    assert torch.isfinite(actual[finite]).all(), f"{what}: NaN/Inf where the truth is finite"
    eager_ok = finite & torch.isfinite(eager)
    err = (actual - truth)[finite].abs().max().item()
    eager_err = (eager - truth)[eager_ok].abs().max().item() if eager_ok.any() else 0.0
    floor = torch.finfo(dtype).eps * truth[finite].abs().max().item()
    assert err <= 2.0 * eager_err + floor, (
        f"{what}: error {err:.3e} exceeds 2 x eager {eager_err:.3e} + floor {floor:.3e}")


def make_probs(x, seed=0, sharp=False):
    """Class-probability targets of x's shape (class dimension 1), in x's dtype: soft (mixup-like)
    rows, or with sharp=True nearly one-hot ones."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(x.shape, generator=g, dtype=torch.float64) * (8.0 if sharp else 1.0)
    return scores.softmax(1).to(x.dtype).to(x.device)


def assert_nan_logits_like_torch(fn, c, dtype, device="cpu", **kw):
    """A NaN logit anywhere in a row (not the max, the target, the whole row, first and then -inf
    up to the last two classes: a streamed row's first blocks hold no finite value) makes that
    row's loss and gradient NaN, as F.cross_entropy does; the other rows stay finite. c >= 2."""
    g = torch.Generator().manual_seed(c)
    x = torch.randn(7, c, generator=g, dtype=torch.float64) * 2
    t = torch.randint(0, c, (7,), generator=g)
    nan = float("nan")
    x[1, (t[1] + 1) % c] = nan  # a class other than the target
    x[2, t[2]] = nan            # the target
    x[3] = nan                  # every class
    x[4, 0], t[4] = nan, 1
    x[4, t[4]] += 30.0          # a confident row with a NaN elsewhere
    x[6, 1:-2], x[6, 0], t[6] = float("-inf"), nan, c - 1  # NaN while the max is still -inf
    x = x.to(dtype).to(device).requires_grad_()
    t = t.to(device)
    loss = fn(x, t, reduction="none", **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    expected = torch.nn.functional.cross_entropy(x.double(), t, reduction="none")
    bad = expected.isnan()
    assert bad.tolist() == [False, True, True, True, True, False, True]
    assert torch.equal(loss.isnan(), bad), (loss, expected)
    assert grad[bad].isnan().all() and torch.isfinite(grad[~bad]).all()


def assert_statistics_only_forward(forward, *args):
    """forward(*args, compute_grad, compute_stats=...) (a focal_loss_forward op; args up to the
    reduction): with compute_stats alone, the loss and the row statistics are those of the forward
    that also writes the gradient, bit for bit, and no gradient is written; without either, none."""
    loss, grad, stats = forward(*args, True)
    loss_s, grad_s, stats_s = forward(*args, False, compute_stats=True)
    assert grad_s.numel() == 0 and stats_s.shape == stats.shape and grad.shape == args[0].shape
    torch.testing.assert_close(loss_s, loss, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(stats_s, stats, rtol=0, atol=0, equal_nan=True)
    loss_n, grad_n, stats_n = forward(*args, False)
    assert grad_n.numel() == 0 and stats_n.numel() == 0
    torch.testing.assert_close(loss_n, loss, rtol=0, atol=0, equal_nan=True)


def assert_backward_in_place_keeps_rows_at_one(forward, backward, backward_, x, target, *args):
    """The in-place gradient phase backward_ over the forward's gradient, with a per-row
    grad_output in the input's dtype (reduction "none"; args: weight, gamma table, ignore_index,
    label_smoothing): the rows whose grad_output is 1 keep the forward's gradient (the GPU
    kernels skip them; the CPU rewrites them to the same bits), the others are rewritten, bit for
    bit as the functional phase writes them."""
    _, grad, stats = forward(x, target, *args, "none", True)
    stored = grad.clone()
    go = torch.linspace(0.5, 1.5, x.shape[0], dtype=x.dtype, device=x.device)
    go[::3] = 1.0
    backward_(grad, go, x, target, args[0], args[1], stats, *args[2:], "none")
    fresh = backward(go, x, target, args[0], args[1], stats, *args[2:], "none")
    ones = go == 1.0
    assert torch.equal(grad[ones], stored[ones]), "a row at grad_output 1 was rewritten"
    torch.testing.assert_close(grad[~ones], fresh[~ones], rtol=0, atol=0, equal_nan=True)


def run_gloo_ranks(fn, world, tmp_path):
    """fn(rank, world) in `world` spawned processes joined in one gloo group: their results, in
    rank order (each saved by its process and loaded here)."""
    mp.spawn(_gloo_rank, args=(fn, world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
             join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]


def _gloo_rank(rank, fn, world, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
