"""What every class-center store does around a margin (docs/heads.md).

A store holds class centers, computes the cosines of a batch to the centers it holds
(``cosines``), lets the margin turn them into logits and takes the cross-entropy over them
(focal-weighted with ``focal_gamma`` > 0). The margin (``facetrain.heads``) never sees the
weight. For a margin with ``fused_epilogue`` the loss takes the fused path instead
(``fused.py``): the store hands over its inputs (``fused_inputs``), and the margin's target
logit, scale and hard-negative rule are applied inside one autograd node.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from facetrain.classifiers.fused import margin_cross_entropy
from facetrain.heads.base import (
    CenterCosines,
    Margin,
    Reduce,
    clamp_cosine,
    no_reduce,
    put_target,
)
from facetrain.losses.base import LossError
from facetrain.losses.focal import focal_loss


class ClassifierError(LossError):
    """A loss / classifier combination that cannot work; the message says what to choose."""


@dataclass
class ClassifierOutput:
    loss: torch.Tensor
    statistics: dict[str, torch.Tensor] | None = None


@dataclass
class FusedInputs:
    """What a store gives the fused epilogue for the ``rows`` it scores: the unit ``features``
    (rows, D) and the float32 ``weight`` (centers · K, D) it multiplies, with their graphs;
    ``cos_y`` (rows, 1) each row's target cosine (max over its K sub-centers), unclamped and
    detached; ``index``, ``norms`` and ``local_norms`` as in ``CenterCosines``; ``distributed``
    whether the softmax spans several ranks' shards."""

    features: torch.Tensor
    weight: torch.Tensor
    cos_y: torch.Tensor
    index: torch.Tensor
    norms: torch.Tensor
    local_norms: torch.Tensor
    distributed: bool = False


class ClassCenters(nn.Module):
    """Base of the stores: ``name`` is what ``classifier=`` selects and margins list in their
    ``stores``. ``rank`` / ``world_size`` say where this process sits (filled from the trainer);
    ``sharded`` stores hold a different part of the centers on every rank. ``focal_gamma``:
    the loss is the focal loss ``−(1 − p)^γ·log p`` of the cross-entropy (0: plain
    cross-entropy; ``facetrain.losses.focal_loss``)."""

    name = ""
    sharded = False

    def __init__(
        self, embedding_size: int, num_classes: int, margin: Margin, rank: int = 0,
        world_size: int = 1, focal_gamma: float = 0.0,
    ):
        super().__init__()
        if not focal_gamma >= 0:
            raise ClassifierError(f"classifier.focal_gamma must be >= 0, got {focal_gamma}")
        self.focal_gamma = float(focal_gamma)
        if self.name not in margin.stores:
            raise ClassifierError(
                f"loss {type(margin).__name__} (with these settings) runs on "
                f"classifier={' or classifier='.join(margin.stores)} only, not "
                f"classifier={self.name}: its math needs more than the cosines to sampled centers"
            )
        margin.bind(num_classes)
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.rank, self.world_size = rank, world_size

    def labels_outside(self, labels: torch.Tensor) -> torch.Tensor:
        """Mask of the labels that are no class index in [0, num_classes) (on the device)."""
        return (labels < 0) | (labels >= self.num_classes)

    def cosines(self, embeddings: torch.Tensor, labels: torch.Tensor, margin: Margin
                ) -> CenterCosines:
        raise NotImplementedError

    def fused_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor, margin: Margin
                     ) -> FusedInputs:
        raise NotImplementedError

    @property
    def centers_per_class(self) -> int:
        return 1

    def state_reduce(self) -> Reduce:
        """How a margin's batch statistics become global (``Margin.update_state``)."""
        return no_reduce

    def cross_entropy(self, logits: torch.Tensor, c: CenterCosines) -> torch.Tensor:
        """The cross-entropy of each row (rows,)."""
        return nn.functional.cross_entropy(logits, c.index.view(-1), reduction="none")

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, margin: Margin,
        statistics: bool = False,
    ) -> ClassifierOutput:
        """The loss of a batch (float32, even under AMP) and, if asked, its statistics."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            if margin.fused_epilogue:
                rows, c = self.fused_cross_entropy(embeddings, labels, margin, statistics)
            else:
                c = self.cosines(embeddings, labels, margin)
                rows = self.cross_entropy(self.margin_logits(c, margin), c)
            loss = focal_loss(rows, self.focal_gamma)
            stats = self.summarize(c, margin, embeddings) if statistics else None
        return ClassifierOutput(loss, stats)

    def margin_logits(self, c: CenterCosines, margin: Margin) -> torch.Tensor:
        """The margin's logits (the reference path); in training its state advances first, on
        global statistics."""
        if margin.training:
            margin.advance(c, self.state_reduce())
        return margin.logits(c)

    def fused_cross_entropy(
        self, embeddings: torch.Tensor, labels: torch.Tensor, margin: Margin,
        keep_cosines: bool,
    ) -> tuple[torch.Tensor, CenterCosines]:
        """The cross-entropy of each row by the fused epilogue, and the ``CenterCosines`` of the
        batch (``cos`` only if ``keep_cosines``). Same loss and gradients as the reference path
        ``cross_entropy(margin_logits(cosines(...)))``, to float32 rounding."""
        inputs = self.fused_inputs(embeddings, labels, margin)
        center_norms = inputs.weight.detach().norm(dim=1)
        k = self.centers_per_class
        class_norms = center_norms.view(-1, k).amax(dim=1) if k > 1 else center_norms
        cos_y = clamp_cosine(inputs.cos_y)
        c = CenterCosines(None, cos_y, inputs.index, inputs.norms, class_norms,
                          inputs.local_norms)
        if margin.training:
            margin.advance(c, self.state_reduce())
        target, slope = target_and_slope(margin, cos_y, inputs.norms)
        # clamp_cosine passes no gradient outside [-1 + eps, 1 - eps]
        slope = slope * (inputs.cos_y == cos_y)
        scale = margin.logit_scale(inputs.norms, class_norms)
        if torch.is_tensor(scale) and scale.numel() != 1 and scale.shape != cos_y.shape:
            raise TypeError(
                f"{type(margin).__name__}.logit_scale gave shape {tuple(scale.shape)}: the fused "
                "epilogue takes one scale or one per row; a scale by class needs fused = False"
            )
        bound = margin.hard_negative_bound(cos_y, inputs.norms, target).detach()
        rows, c.cos = margin_cross_entropy(
            inputs.features, inputs.weight, center_norms, target, slope, bound, scale,
            inputs.index, margin, k, inputs.distributed, keep_cosines,
        )
        return rows, c

    @torch.no_grad()
    def statistics(self, embeddings: torch.Tensor, labels: torch.Tensor, margin: Margin
                   ) -> dict[str, torch.Tensor]:
        """The statistics of a batch on their own (no loss, no state update)."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self.summarize(self.cosines(embeddings, labels, margin), margin, embeddings)

    def summarize(self, c: CenterCosines, margin: Margin, embeddings: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
        """What a person watches to see a margin loss work (docs/heads.md, "What to log"):
        per sample ``theta_y`` and ``theta_max_negative`` in degrees (histograms); batch scalars
        ``accuracy`` (un-margined top-1), ``cos_max_negative`` and ``hard_negative_fraction``
        (share of samples whose best non-target cosine beats the margin-modulated target)."""
        raise NotImplementedError


def target_and_slope(margin: Margin, cos_y: torch.Tensor, norms: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``T(cos_y)`` (rows, 1) with its graph to everything but ``cos_y`` (the norms: MagFace's
    margin), and ``T'(cos_y)`` detached, by autograd on the N target cosines: the fused node
    routes the gradient through ``cos_y`` itself, so a margin writes T once, without its
    derivative."""
    if not torch.is_grad_enabled():
        return margin.target_logit(cos_y, norms), torch.zeros_like(cos_y)
    leaf = cos_y.detach().requires_grad_(True)
    target = margin.target_logit(leaf, norms)
    if not target.requires_grad:
        return target, torch.zeros_like(cos_y)
    (slope,) = torch.autograd.grad(target, leaf, torch.ones_like(target), retain_graph=True,
                                   allow_unused=True)
    return target, torch.zeros_like(cos_y) if slope is None else slope


def best_other(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per row, the largest score outside the target column (N,)."""
    return put_target(scores, index, torch.full_like(scores[:, :1], -math.inf)).amax(dim=1)


@torch.no_grad()
def margin_statistics(
    cos_y: torch.Tensor, cos_negative: torch.Tensor, correct: torch.Tensor, target: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``ClassCenters.summarize`` from the per-row target cosine, best non-target cosine,
    top-1 correctness and modulated target (all (N,), detached)."""
    cos_y, cos_negative = clamp_cosine(cos_y), clamp_cosine(cos_negative)
    return {
        "accuracy": correct.float().mean(),
        "theta_y": torch.rad2deg(torch.acos(cos_y)),
        "theta_max_negative": torch.rad2deg(torch.acos(cos_negative)),
        "cos_max_negative": cos_negative.mean(),
        "hard_negative_fraction": (cos_negative > target).float().mean(),
    }
