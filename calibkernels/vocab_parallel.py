"""The vocabulary-parallel focal loss (CONTRACT §6): the logits sharded over classes across a
process group, as tensor-parallel LLM training holds them; every rank gets the same loss and its
shard's gradient, equal to the single-process result, and only a few numbers per row cross the
network — never the logits.

The phases (csrc/calibkernels.cpp, focal_loss_partial_stats ... focal_loss_window_grad):
  1. each rank's statistics of its shard: max, #equal to it, sum of exp(x - max) over the rest,
     the target's logit if the shard holds it (one read of the shard);
  2. all-reduce MAX of (max, target logit), then SUM of the sums rescaled to the global max;
  3. with label smoothing, each rank's sums of the smoothing terms at the global statistics (a
     second read), all-reduced (SUM);
  4. every rank forms each row's loss and RowStats (the rows' epilogue) from the same numbers;
  5. backward: each rank's gradient slice from the RowStats, grad_output applied (one read, one
     write of the shard).
"""

import torch
import torch.distributed as dist

from . import ops
from .schedule import gamma_table

REDUCTIONS = ("none", "mean", "sum")


def _shard_layout(n_local, group):
    """(class_offset, n_classes): this rank's first class and the total, from every rank's shard
    width in rank order (uneven shards allowed)."""
    world = dist.get_world_size(group)
    widths = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    mine = torch.tensor([n_local], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":  # nccl gathers CUDA tensors only
        dev = torch.device("cuda", torch.cuda.current_device())
        widths = [w.to(dev) for w in widths]
        mine = mine.to(dev)
    dist.all_gather(widths, mine, group=group)
    widths = [int(w.item()) for w in widths]
    rank = dist.get_rank(group)
    return sum(widths[:rank]), sum(widths)


def combine_stats(partial, group=None):
    """The phase-1 statistics of every rank's shard combined into the whole row's: (N, 4)
    [max, #equal to it, sum of exp(x - max) over the rest, the target's logit]."""
    extremes = partial[:, [0, 3]].clone()  # max and target logit: -inf where a shard lacks them
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    m, n_max, rest = partial[:, 0], partial[:, 1], partial[:, 2]
    top = extremes[:, 0]
    at_top = m == top
    # a shard whose max is below the row's: all of its terms become the rest, rescaled
    scale = torch.where(at_top, torch.ones_like(m), torch.exp(m - top))
    sums = torch.stack([torch.where(at_top, n_max, torch.zeros_like(n_max)),
                        torch.where(at_top, rest, (n_max + rest) * scale)], 1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return torch.stack([top, sums[:, 0], sums[:, 1], extremes[:, 1]], 1)


class _VocabParallelFocalLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, table, group, offset, n_classes, ignore_index, reduction, eps):
        row = combine_stats(ops.focal_loss_partial_stats(x, target, offset, ignore_index), group)
        sums = x.new_empty((0, 2), dtype=row.dtype)
        if eps > 0:
            sums = ops.focal_loss_partial_sums(x, target, table, row, offset, n_classes,
                                               ignore_index, eps)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        loss, stats = ops.focal_loss_finish(row, sums, target, table, n_classes, ignore_index,
                                            eps, reduction)
        ctx.save_for_backward(x, target, stats)
        ctx.options = (offset, n_classes, ignore_index, eps, reduction)
        return loss.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, target, stats = ctx.saved_tensors
        offset, n_classes, ignore_index, eps, reduction = ctx.options
        grad = ops.focal_loss_window_grad(grad_output, x, target, stats, offset, n_classes,
                                          ignore_index, eps, reduction)
        return grad, None, None, None, None, None, None, None, None


def vocab_parallel_focal_loss(local_logits, target, group=None, *, gamma=3.0, ignore_index=-100,
                              reduction="mean", label_smoothing=0.0):
    """Focal loss of logits sharded over classes across ``group`` (default: the world): rank r
    holds local_logits (N, V_r), a contiguous slice of the classes in rank order (uneven slices
    allowed), and every rank holds the same class-index target (N). Returns the same loss on every
    rank; backward gives each rank its slice's gradient — equal to focal_loss on the whole
    logits. gamma, ignore_index, reduction and label_smoothing are focal_loss's (no class
    weights). Works with gloo (CPU tensors) and nccl (CUDA tensors)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("vocab_parallel_focal_loss needs an initialised torch.distributed "
                           "process group (on one process, use calibkernels.focal_loss)")
    if not isinstance(local_logits, torch.Tensor) or local_logits.dim() != 2 or \
            not local_logits.is_floating_point():
        raise ValueError("vocab_parallel_focal_loss: local_logits must be a 2-D (N, V_r) floating "
                         "tensor")
    ops.check_float(local_logits, "vocab_parallel_focal_loss: local_logits")
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or \
            tuple(target.shape) != (local_logits.shape[0],):
        raise ValueError(f"vocab_parallel_focal_loss: target must hold class indices of shape "
                         f"({local_logits.shape[0]},)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"vocab_parallel_focal_loss: reduction must be one of {REDUCTIONS}, "
                         f"got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"vocab_parallel_focal_loss: label_smoothing must be in [0, 1], got "
                         f"{label_smoothing}")
    offset, n_classes = _shard_layout(local_logits.shape[1], group)
    return _VocabParallelFocalLoss.apply(local_logits, target, gamma_table(gamma).cpu(), group,
                                         offset, n_classes, int(ignore_index), reduction,
                                         float(label_smoothing))
