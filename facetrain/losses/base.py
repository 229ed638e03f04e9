"""What every loss on embeddings and labels alone (no class centers) looks like."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class LossError(ValueError):
    """A loss configuration that cannot work; the message says what to choose (the command line
    prints it as ``facetrain: config error: ...``, without a traceback)."""


@dataclass
class LossOutput:
    """A batch's loss and the detached scalars worth watching (logged as
    ``train/<term>_<name>``; tensors, so logging costs no host sync)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class EmbeddingLoss(nn.Module):
    """A loss computed from a batch's embeddings (N, D) and labels (N,) alone.

    ``needs_identity_batches``: the loss is made of pairs or triplets inside the batch, so every
    batch must hold several images of each of its identities (P×K batches,
    ``data/sampler=identity_balanced``); a run without them stops at start-up.
    ``needs_classification``: the term is meaningless alone (the center loss). State (the
    center loss's centers) lives in buffers: checkpointed, resumed, and put back with the rest
    of the model when a non-finite step is skipped.
    """

    needs_identity_batches = True
    needs_classification = False  # True: only beside a head's cross-entropy (loss=...)

    def bind(self, num_classes: int, embedding_size: int) -> None:
        """Called once before training with the number of classes and the embedding size."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        raise NotImplementedError


def unit_squared_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """``|x̃_i − x̃_j|²`` (N, N) between the L2-normalised embeddings, in float32: ``2 − 2·cos``,
    clamped at 0 (rounding can make it slightly negative)."""
    unit = F.normalize(embeddings.float(), dim=1)
    return (2.0 - 2.0 * unit @ unit.T).clamp_min(0.0)


def identity_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) (N, N) masks: same identity without the diagonal; other identity."""
    same = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(labels.numel(), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; 0 (with a gradient path, never NaN) where none is."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
