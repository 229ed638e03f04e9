"""Contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006) over every pair of a batch."""

import torch
import torch.nn.functional as F

from facetrain.losses.base import (
    EmbeddingLoss,
    LossError,
    LossOutput,
    identity_masks,
    masked_mean,
    unit_squared_distances,
)


class ContrastiveLoss(EmbeddingLoss):
    """``½·D²`` for a pair of the same identity, ``½·max(0, m − D)²`` for a pair of two.

    ``D`` is the Euclidean distance of the L2-normalised embeddings (in [0, 2]). Convention:
    the loss-overview seed writes ``(1 − Y)·½·D² + Y·½·max(0, m − D)²`` with ``Y = 1`` for a
    *different* pair; here the flag is "same identity", i.e. ``Y = 1 − same``. Every unordered
    pair i < j of the batch counts once. The two halves are each averaged over their own pairs
    and then added: a P×K batch holds K−1 positives but (P−1)·K negatives per image, and a
    mean over all pairs would let the negatives drown the positives. A batch without a
    positive (or negative) pair gives 0 for that half and logs ``positive_pairs`` = 0.
    """

    def __init__(self, margin: float = 1.0):
        super().__init__()
        if not 0 < margin <= 2:
            raise LossError(f"contrastive margin must be in (0, 2] (unit vectors), got {margin}")
        self.margin = float(margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        squared = unit_squared_distances(embeddings)
        positive, negative = identity_masks(labels)
        upper = torch.ones_like(positive).triu(diagonal=1)
        positive, negative = positive & upper, negative & upper
        # clamp before sqrt: a pair of identical embeddings would get an infinite gradient
        hinge = F.relu(self.margin - squared.clamp_min(1e-12).sqrt())
        loss = masked_mean(0.5 * squared, positive) + masked_mean(0.5 * hinge.square(), negative)
        return LossOutput(loss, {
            "positive_pairs": positive.sum().detach().float(),
            "active_negative_fraction": masked_mean((hinge > 0).float(), negative).detach(),
            "positive_distance": masked_mean(squared, positive).detach().sqrt(),
        })
