"""What every class-center store does around a margin (docs/heads.md).

A store holds class centers, computes the cosines of a batch to the centers it holds
(``cosines``), lets the margin turn them into logits and takes the cross-entropy over them
(focal-weighted with ``focal_gamma`` > 0). The margin (``facetrain.heads``) never sees the
weight.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from facetrain.heads.base import CenterCosines, Margin, Reduce, clamp_cosine, no_reduce, put_target
from facetrain.losses.base import LossError
from facetrain.losses.focal import focal_loss


class ClassifierError(LossError):
    """A loss / classifier combination that cannot work; the message says what to choose."""


@dataclass
class ClassifierOutput:
    loss: torch.Tensor
    statistics: dict[str, torch.Tensor] | None = None


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
            c = self.cosines(embeddings, labels, margin)
            loss = focal_loss(self.cross_entropy(self.margin_logits(c, margin), c),
                              self.focal_gamma)
            stats = self.summarize(c, margin, embeddings) if statistics else None
        return ClassifierOutput(loss, stats)

    def margin_logits(self, c: CenterCosines, margin: Margin) -> torch.Tensor:
        """The margin's logits; in training its state advances first, on global statistics."""
        if margin.training:
            margin.update_state(c.cos_y.detach(), c.norms.detach(), self.state_reduce())
        return margin.logits(c)

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
