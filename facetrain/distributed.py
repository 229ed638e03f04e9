"""The collectives facetrain runs on (Partial-FC's, the module's checks, the center loss's
update), with the gradients DDP expects.

Every rank computes the same global-batch loss; DDP then *averages* the backbone gradients over
the ranks. So the all-gather of the embeddings hands each rank the gradient of its own rows
summed over every rank's shard, times the world size, and the averaged backbone gradient is the
gradient of the global-batch mean loss (insightface arcface_torch's ``AllGatherFunc`` does the
same). The sharded cross-entropy reduces the row maximum, the sum of exponentials and the target
logit over the shards and writes its gradient itself: softmax minus the one-hot target, per row.
"""

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every rank (in place; no gradient)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (equal shapes) concatenated in rank order, without gradient."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows concatenated in rank order, without gradient, where ranks may hold
    different numbers of rows: each pads to the largest count, and the padding is dropped."""
    counts = all_gather_rows(torch.tensor([tensor.shape[0]], device=tensor.device)).tolist()
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = all_gather_rows(padded.unsqueeze(0))
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


class _GatherWithGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        ctx.rows = rows.shape[0]
        return all_gather_rows(rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every shard's gradient of every row (gloo has no reduce_scatter)
        rank, world = dist.get_rank(), dist.get_world_size()
        return grad[rank * ctx.rows:(rank + 1) * ctx.rows] * world


def gather_with_gradient(rows: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (equal counts); the backward returns this rank's rows' gradient of the
    global loss, scaled for DDP's averaging (module docstring)."""
    return _GatherWithGradient.apply(rows)


class _ShardedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        held = index >= 0
        column = index.clamp_min(0)
        row_max = logits.detach().amax(dim=1, keepdim=True)
        dist.all_reduce(row_max, dist.ReduceOp.MAX)
        exp = torch.exp(logits - row_max)
        total = exp.sum(dim=1, keepdim=True)
        dist.all_reduce(total)
        target = torch.where(held, logits.gather(1, column), torch.zeros_like(row_max))
        dist.all_reduce(target)  # exactly one rank holds each row's target
        probability = exp.div_(total)
        ctx.save_for_backward(probability, column, held)
        return (torch.log(total) + row_max - target).squeeze(1)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        probability, column, held = ctx.saved_tensors
        grad = probability.scatter_add(1, column, -held.to(probability.dtype))
        return grad * grad_rows.unsqueeze(1), None


def sharded_cross_entropy(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of each row (rows,) whose classes are split over the ranks:
    ``logits`` (global rows, this rank's columns), ``index`` the target column here or -1 where
    another rank holds it. Equals ``F.cross_entropy(..., reduction="none")`` on the concatenated
    columns, to float precision."""
    return _ShardedCrossEntropy.apply(logits, index)
