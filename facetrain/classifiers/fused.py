"""The fused epilogue of a cosine margin: one autograd node from the unit embeddings and the class
centers to the cross-entropy of every row, with as few passes over the (N, C) matrix as the math
needs. The stores run it for every margin whose ``Margin.fused_epilogue`` is true.

Written by hand because a margin changes N values, not N·C: only the target column gets
``s·T(cos_y)``, every other logit is ``s·cos_j`` (or a hard negative's ``s·h(cos_j)``), and the
softmax cross-entropy's gradient is ``softmax − one-hot``. Autograd through ``Margin.logits`` and
``F.cross_entropy`` instead makes a new (N, C) tensor for every step of the formula (division by
the center norms, gather, scatter, scale, log-softmax) and again for each in the backward.

Forward, on the one (N, C·K) buffer of the product, in row blocks of ~2 MiB so that the passes
after the product run in cache::

    P = x̂·Wᵀ;  P /= |W_j|             the cosines [max over K sub-centers: an (N, C) buffer]
    hard negatives: P = h(P)          where cos_j > T(cos_y) (MV-Softmax, CurricularFace)
    P *= s;  P[i, y_i] = s·T(cos_y)   T computed beforehand, on the N target cosines
    P = exp(P − max_j P)              loss = log Σ_j P + max − s·T(cos_y)
    P *= h'(cos_j) on hard negatives  the backward's slope, folded in (1 elsewhere)

Backward: ``P *= g·s/Σ`` is the gradient of the cosines off the target column; on it
``g·s·(p_y − 1)·T'(cos_y)``, with T' from autograd on the N target cosines; ``P /= |W_j|``; the
two matrix products of a linear layer; and the gradient through the center norms as the
projection ``dL/dW_j = B_j − (B_j·Ŵ_j)·Ŵ_j`` of the product's weight gradient B, a pass over the
(C, D) weight gradient instead of several over (N, C). With several Partial-FC ranks the row
maximum and sum are reduced over the shards, as ``distributed.sharded_cross_entropy`` does.

The node overwrites what it saved: its backward runs once (``retain_graph`` is refused).
"""

from collections.abc import Iterator

import torch
import torch.distributed as dist

from facetrain.heads.base import Margin

# Row blocks of about this many elements (2 MiB of float32): a block's passes stay in cache.
BLOCK_ELEMENTS = 1 << 19
# Center norms are clamped to this floor, as the reference path's ``clamp_min`` does, which
# also stops their gradient there.
NORM_FLOOR = 1e-12


def row_blocks(rows: int, columns: int) -> Iterator[slice]:
    step = max(1, BLOCK_ELEMENTS // max(columns, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def margin_cross_entropy(
    features: torch.Tensor, weight: torch.Tensor, center_norms: torch.Tensor,
    target: torch.Tensor, target_slope: torch.Tensor, bound: torch.Tensor,
    scale: float | torch.Tensor, index: torch.Tensor, margin: Margin, subcenters: int = 1,
    distributed: bool = False, keep_cosines: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The cross-entropy (rows,) of ``margin`` on the cosines of ``features`` (rows, D), unit
    vectors, to the rows of ``weight`` (C·K, D) with norms ``center_norms`` (C·K,) (detached),
    and the (rows, C) cosines if ``keep_cosines`` (detached, for statistics; else None).

    ``target`` (rows, 1) is ``T(cos_y)`` with its autograd graph (to the norms, for MagFace) and
    ``target_slope`` (rows, 1) its derivative in ``cos_y``, detached; ``bound`` (rows, 1) what a
    hard negative exceeds (``Margin.hard_negative_bound``), detached; ``scale`` a float or a
    tensor of one value or one per row (rows, 1); ``index`` (rows, 1) the target's column, -1
    where another rank holds it (then ``distributed`` reduces the softmax over the ranks).
    """
    loss, kept = _MarginCrossEntropy.apply(
        features, weight, center_norms, target, target_slope, bound, scale, index, margin,
        subcenters, distributed, keep_cosines,
    )
    return loss, kept if keep_cosines else None


class _MarginCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, weight, center_norms, target, target_slope, bound, scale, index,
                margin, subcenters, distributed, keep_cosines):
        rows = features.shape[0]
        inverse = 1.0 / center_norms.clamp_min(NORM_FLOOR)
        product = torch.mm(features, weight.t())
        classes = product.shape[1] // subcenters
        held = index >= 0
        column = index.clamp_min(0)
        target = target.detach()
        per_row = torch.is_tensor(scale)
        scale_rows = scale.detach().expand(rows, 1) if per_row else scale
        scale_grad = per_row and ctx.needs_input_grad[6]
        cos = product.new_empty(rows, classes) if subcenters > 1 else product
        kept = cos.new_empty(rows, classes) if keep_cosines else cos.new_empty(0)
        row_max = cos.new_empty(rows, 1)
        total = cos.new_empty(rows, 1)
        weighted = cos.new_empty(rows, 1) if scale_grad else None
        for r in row_blocks(rows, product.shape[1]):
            block = product[r].mul_(inverse)
            if subcenters > 1:  # P becomes the max's mask (ties share), kept for the backward
                nested = block.view(-1, classes, subcenters)
                torch.amax(nested, dim=2, out=cos[r])
                nested.eq_(cos[r].unsqueeze(2))
                nested.div_(nested.sum(dim=2, keepdim=True))
                block = cos[r]
            if keep_cosines:
                kept[r] = block
            s = scale_rows[r] if per_row else scale_rows
            value = margin.hard_negative_logit(block)
            slope = None
            if value is not None:
                hard = block > bound[r]
                slope = torch.where(hard, margin.hard_negative_slope(block), 1.0)
                torch.where(hard, value, block, out=block)
                # the target column is no negative: slope 1 where this store holds it
                slope.scatter_(1, column[r], torch.where(held[r], 1.0, slope.gather(1, column[r])))
            block.mul_(s)
            block.scatter_(1, column[r],
                           torch.where(held[r], s * target[r], block.gather(1, column[r])))
            torch.amax(block, dim=1, keepdim=True, out=row_max[r])
            if scale_grad:  # sum_j exp(logit_j − max)·u_j with u = logit / s
                exp = torch.exp(block - row_max[r])
                weighted[r] = torch.bmm(exp.unsqueeze(1), block.unsqueeze(2)).view(-1, 1) / s
                block.copy_(exp)
            else:
                block.sub_(row_max[r]).exp_()
            torch.sum(block, dim=1, keepdim=True, out=total[r])
            if slope is not None:
                block.mul_(slope)
        if distributed:  # each rank's sum rescaled to the global maximum, then summed
            local_max = row_max.clone()
            dist.all_reduce(row_max, dist.ReduceOp.MAX)
            rescale = torch.exp(local_max - row_max)
            total.mul_(rescale)
            dist.all_reduce(total)
            factor = rescale / total
        else:
            factor = 1.0 / total
        loss = (torch.log(total) + row_max - scale_rows * target).squeeze(1)
        ctx.constants = (subcenters, classes, None if per_row else scale,
                         scale.shape if per_row else None)
        ctx.spent = False
        ctx.save_for_backward(
            features, weight, center_norms, inverse, cos, product if subcenters > 1 else None,
            factor, column, held, target, target_slope, scale_rows if per_row else None,
            weighted,
        )
        ctx.mark_non_differentiable(kept)
        return loss, kept

    @staticmethod
    def backward(ctx, grad_loss, _grad_kept):
        if ctx.spent:
            raise RuntimeError("the fused margin epilogue overwrites what it saved: its backward "
                               "runs once (no retain_graph)")
        ctx.spent = True
        (features, weight, center_norms, inverse, grad, mask, factor, column, held, target,
         target_slope, scale_rows, weighted) = ctx.saved_tensors
        subcenters, classes, scale, scale_shape = ctx.constants
        if scale_rows is not None:
            scale = scale_rows
        rows = features.shape[0]
        g = grad_loss.view(rows, 1)
        row_factor = g * factor * scale  # dL/dlogit_j = g·p_j off the target; dlogit/du = s
        p_target = grad.gather(1, column) * factor
        grad_target = torch.where(held, g * scale * (p_target - 1.0), 0.0)
        grad_column = grad_target * target_slope
        grad_scale = None
        if weighted is not None:  # dL/ds = g·(sum_j p_j·u_j − T), T where the target is held
            grad_scale = g * (weighted * factor - torch.where(held, target, 0.0))
            if tuple(scale_shape) != (rows, 1):
                grad_scale = grad_scale.sum().reshape(scale_shape)
        for r in row_blocks(rows, classes):
            block = grad[r].mul_(row_factor[r])
            block.scatter_(1, column[r],
                           torch.where(held[r], grad_column[r], block.gather(1, column[r])))
            if subcenters > 1:
                mask[r].view(-1, classes, subcenters).mul_(block.unsqueeze(2))
                mask[r].mul_(inverse)
            else:
                block.mul_(inverse)
        grad_product = mask if subcenters > 1 else grad
        grad_features = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_features = torch.mm(grad_product, weight)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(grad_product.t(), features)
            project_out_norm_direction(grad_weight, weight, center_norms, inverse)
        return (grad_features, grad_weight, None, grad_target, None, None, grad_scale,
                None, None, None, None, None)


def project_out_norm_direction(grad: torch.Tensor, weight: torch.Tensor,
                               center_norms: torch.Tensor, inverse: torch.Tensor) -> None:
    """``grad_j −= (grad_j·W_j)/|W_j|²·W_j`` in place, in row blocks (one read of each matrix):
    the gradient of ``W_j/|W_j|`` given the gradient B of the product with ``W_j`` that was then
    divided by ``|W_j|``. Not where the norm is clamped (its gradient is cut there)."""
    along = torch.where(center_norms > NORM_FLOOR, inverse * inverse, 0.0).unsqueeze(1)
    for r in row_blocks(grad.shape[0], grad.shape[1]):
        dot = torch.bmm(grad[r].unsqueeze(1), weight[r].unsqueeze(2)).view(-1, 1)
        grad[r].addcmul_(weight[r], dot.mul_(along[r]), value=-1.0)
