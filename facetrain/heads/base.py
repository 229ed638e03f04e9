"""The shared cosine core every margin head is built on (see heads.md).

Every head computes ``cos_j = <x/|x|, W_j/|W_j|>``, modulates the target cosine with ``T`` and
the non-target cosines with ``N``, and multiplies by a scale::

    logit_y = scale * T(cos_y)        logit_j = scale * N(cos_j, T(cos_y))   (j != y)

A head says only what differs (``target_logit``, ``non_target_logit``, ``scale``); this class does
the normalisation, float32 math, clamping, the target gather/scatter and the statistics that are
logged to TensorBoard.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# Cosines are kept this far inside [-1, 1] so that acos and sqrt(1 - cos^2) have finite gradients.
COS_EPS = 1e-7


class CosineMarginHead(nn.Module):
    """Class-center matrix ``weight`` (num_classes, embedding_size) and the cosine core."""

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0):
        super().__init__()
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def similarity(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Un-margined similarity to every class center, float32: the cosine (N, C)."""
        x = F.normalize(embeddings.float(), dim=1)
        w = F.normalize(self.weight.float(), dim=1)
        return F.linear(x, w).clamp(-1 + COS_EPS, 1 - COS_EPS)

    def target_logit(self, cos_y: torch.Tensor) -> torch.Tensor:
        """T(cos_y) before scaling; identity for plain normalised softmax."""
        return cos_y

    def non_target_logit(self, cos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """N(cos_j) before scaling, given the modulated target (N, 1); identity by default."""
        return cos

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) on which cross-entropy is the loss; always float32, even under AMP."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos = self.similarity(embeddings)
            index = labels.view(-1, 1)
            target = self.target_logit(cos.gather(1, index))
            logits = self.non_target_logit(cos, target).scatter(1, index, target)
            return logits * self.scale

    def extra_loss(self) -> torch.Tensor | None:
        """An additional loss term of the last forward (e.g. MagFace's regulariser); none here."""
        return None

    def state_metrics(self) -> dict[str, float]:
        """Scalar head state worth watching (lambda, t, learnt scale, ...); none here."""
        return {}

    @torch.no_grad()
    def statistics(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a person watches to see a margin loss work (heads.md, "What to log").

        Returns per-sample ``theta_y`` and ``theta_max_negative`` in degrees (histograms) and the
        batch scalars ``accuracy`` (un-margined top-1), ``cos_max_negative`` and
        ``hard_negative_fraction`` (share of samples whose best non-target cosine beats the
        margin-modulated target cosine).
        """
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos = F.normalize(embeddings.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).T
            cos = cos.clamp(-1 + COS_EPS, 1 - COS_EPS)
            index = labels.view(-1, 1)
            cos_y = cos.gather(1, index)
            cos_negative = cos.scatter(1, index, -math.inf).amax(dim=1)
            target = self.target_logit(cos_y).squeeze(1)
            plain = self.similarity(embeddings)
        return {
            "accuracy": (plain.argmax(dim=1) == labels).float().mean(),
            "theta_y": torch.rad2deg(torch.acos(cos_y.squeeze(1))),
            "theta_max_negative": torch.rad2deg(torch.acos(cos_negative)),
            "cos_max_negative": cos_negative.mean(),
            "hard_negative_fraction": (cos_negative > target).float().mean(),
        }
