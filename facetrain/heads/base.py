"""The shared cosine core every margin head is built on (see heads.md).

Every head computes ``cos_j = <x/|x|, W_j/|W_j|>``, modulates the target cosine with ``T`` and
the non-target cosines with ``N``, and multiplies by a scale::

    logit_y = scale * T(cos_y)        logit_j = scale * N(cos_j, T(cos_y))   (j != y)

A head says only what differs (``target_logit``, ``non_target_logit``, ``logit_scale``, and
``update_state`` for heads with state); this class does the normalisation, float32 math,
clamping, the target gather/scatter and the statistics that are logged to TensorBoard.

State (iteration counters, running averages) lives in registered buffers, so it is saved in
checkpoints and restored on resume; ``update_state`` runs only in training mode.
An extra loss term (MagFace's regulariser, NormFace's agent losses) is returned by
``extra_loss()`` after a training forward; the module adds it to the cross-entropy and logs it.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# Cosines are kept this far inside [-1, 1] so that acos and sqrt(1 - cos^2) have finite gradients.
COS_EPS = 1e-7


def additive_angular_margin(cos_y: torch.Tensor, margin) -> torch.Tensor:
    """``cos(theta + m)`` where ``theta + m <= pi``, else insightface's fallback
    ``cos - m·sin(m)``, so the target logit keeps decreasing in theta. ``margin`` may be a
    float or a per-sample tensor (MagFace)."""
    margin = torch.as_tensor(margin, dtype=cos_y.dtype, device=cos_y.device)
    sin_y = torch.sqrt(1.0 - cos_y * cos_y)
    cos_y_plus_m = cos_y * torch.cos(margin) - sin_y * torch.sin(margin)
    return torch.where(
        cos_y > torch.cos(math.pi - margin), cos_y_plus_m, cos_y - margin * torch.sin(margin)
    )


def cosine_to_centers(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``<x/|x|, W_j/|W_j|>`` (N, C) in float32.

    Dividing the product by the row norms of W, instead of normalising W first, never
    materialises a normalised copy of the (C, D) matrix: with many classes that copy and its
    backward cost as much as the matrix product itself. Not clamped: only the target cosine
    goes through acos/sqrt (clamped in ``forward``), so the (N, C) matrix is spared a pass.
    """
    weight = weight.float()
    product = F.linear(F.normalize(x, dim=1), weight)
    return product / weight.norm(dim=1).clamp_min(1e-12)


def clamp_cosine(cos: torch.Tensor) -> torch.Tensor:
    """Keep cosines inside (-1, 1) so that acos and sqrt(1 - cos^2) have finite gradients."""
    return cos.clamp(-1 + COS_EPS, 1 - COS_EPS)


class CosineMarginHead(nn.Module):
    """Class-center matrix ``weight`` (num_classes, embedding_size) and the cosine core."""

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0):
        super().__init__()
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        self._extra_loss: torch.Tensor | None = None

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine (N, C) of float32 embeddings to every class center."""
        return cosine_to_centers(x, self.weight)

    def unmargined_logits(self, x: torch.Tensor) -> torch.Tensor:
        """What the head would output with no margin; its argmax is the predicted class."""
        return self.cosine(x)

    def logit_scale(self, norms: torch.Tensor):
        """Multiplier of the modulated cosines: a constant s here, |x| or |x||W_j| elsewhere."""
        return self.scale

    def target_logit(self, cos_y: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """T(cos_y) (N, 1) before scaling, given the embedding norms (N, 1)."""
        return cos_y

    def non_target_logit(self, cos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """N(cos_j) (N, C) before scaling, given the modulated target (N, 1)."""
        return cos

    def update_state(self, cos_y: torch.Tensor, norms: torch.Tensor) -> None:
        """Advance the head's state from a training batch (detached inputs); none here."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) on which cross-entropy is the loss; always float32, even under AMP."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = embeddings.float()
            norms = x.norm(dim=1, keepdim=True)
            cos = self.cosine(x)
            index = labels.view(-1, 1)
            cos_y = clamp_cosine(cos.gather(1, index))
            if self.training:
                self.update_state(cos_y.detach(), norms.detach())
            target = self.target_logit(cos_y, norms)
            logits = self.non_target_logit(cos, target).scatter(1, index, target)
            return logits * self.logit_scale(norms)

    def extra_loss(self) -> torch.Tensor | None:
        """The extra loss term of the last training forward, if the head has one (once)."""
        extra, self._extra_loss = self._extra_loss, None
        return extra

    def state_metrics(self) -> dict[str, float]:
        """Scalar head state worth watching (lambda, t, learnt scale, norm statistics)."""
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
            x = embeddings.float()
            cos = clamp_cosine(self.cosine(x))
            index = labels.view(-1, 1)
            cos_y = cos.gather(1, index)
            cos_negative = cos.scatter(1, index, -math.inf).amax(dim=1)
            target = self.target_logit(cos_y, x.norm(dim=1, keepdim=True)).squeeze(1)
            accuracy = (self.unmargined_logits(x).argmax(dim=1) == labels).float().mean()
        return {
            "accuracy": accuracy,
            "theta_y": torch.rad2deg(torch.acos(cos_y.squeeze(1))),
            "theta_max_negative": torch.rad2deg(torch.acos(cos_negative)),
            "cos_max_negative": cos_negative.mean(),
            "hard_negative_fraction": (cos_negative > target).float().mean(),
        }
