"""Triplet loss with online mining inside the batch (Schroff, Kalenichenko & Philbin, FaceNet,
CVPR 2015; batch-hard: Hermans, Beyer & Leibe, 2017)."""

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

MINING = ("semihard", "batch_hard")


class TripletLoss(EmbeddingLoss):
    """``[|a − p|² − |a − n|² + α]₊`` on L2-normalised embeddings (FaceNet: α = 0.2).

    ``mining="semihard"`` (FaceNet): every anchor-positive pair (a, p) of the batch is a
    triplet, with the closest negative farther than the positive: ``d(a,p) < d(a,n)``; it is
    semi-hard, and the triplet active, when also ``d(a,n) < d(a,p) + α``. Fallback when no
    negative is farther than the positive (all of them are hard): the least hard one (the
    largest ``d(a,n)``), as TensorFlow Addons' ``triplet_semihard_loss`` does; when the closest
    farther negative lies beyond the window, the triplet is easy and gives 0. The hardest
    negatives are never taken: FaceNet found they collapse the model early in training.
    ``mining="batch_hard"``: one triplet per anchor, its farthest positive and closest negative.

    The loss is the mean over the triplets (active or not); ``active_fraction`` logs how many
    give a gradient, ``triplets`` how many the batch had (0: no anchor with both a positive and
    a negative, the loss is then 0).
    """

    def __init__(self, margin: float = 0.2, mining: str = "semihard"):
        super().__init__()
        if mining not in MINING:
            raise LossError(f"triplet mining must be one of {', '.join(MINING)}, got {mining!r}")
        if margin <= 0:
            raise LossError(f"triplet margin must be positive, got {margin}")
        self.margin, self.mining = float(margin), mining

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        squared = unit_squared_distances(embeddings)
        positive, negative = identity_masks(labels)
        has_negative = negative.any(dim=1, keepdim=True)
        if self.mining == "semihard":
            d_ap, d_an = squared, semihard_negative_distances(squared, negative)
            valid = positive & has_negative  # (anchor, positive) pairs
        else:
            d_ap = squared.masked_fill(~positive, -1.0).amax(dim=1)
            d_an = squared.masked_fill(~negative, 5.0).amin(dim=1)  # 5 > any squared distance
            valid = positive.any(dim=1) & has_negative.squeeze(1)  # anchors
        losses = F.relu(d_ap - d_an + self.margin)
        return LossOutput(masked_mean(losses, valid), {
            "triplets": valid.sum().detach().float(),
            "active_fraction": masked_mean((losses > 0).float(), valid).detach(),
        })


def semihard_negative_distances(squared: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """For every (anchor a, positive p): ``d(a, n)`` of the negative FaceNet's semi-hard mining
    picks (``TripletLoss``): the smallest ``d(a, n) > d(a, p)``, else the largest ``d(a, n)``.
    (N, N), differentiable in ``squared``. Each anchor's negatives are sorted once and every
    positive's threshold is found by binary search: O(N² log N), never an (N, N, N) tensor."""
    rows = squared.shape[0]
    # non-negatives sort last (+inf); each row's first `count` entries are its negatives
    keys = squared.detach().masked_fill(~negative, float("inf"))
    sorted_keys, order = keys.sort(dim=1)
    count = negative.sum(dim=1, keepdim=True)
    farther = torch.searchsorted(sorted_keys, squared.detach().contiguous(), right=True)
    fallback = (count - 1).clamp_min(0).expand(rows, rows)  # the farthest negative
    position = torch.where(farther < count, farther, fallback)
    return squared.gather(1, order.gather(1, position))
