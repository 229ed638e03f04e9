"""Normalised softmax heads without an angular margin: L2-Softmax and NormFace."""

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from facetrain.heads.base import CenterCosines, Margin
from facetrain.heads.softmax import Softmax

log = logging.getLogger(__name__)


def l2_softmax_alpha_low(num_classes: int, probability: float = 0.9) -> float:
    """The smallest alpha for which a feature on its class center can reach ``probability``
    (Ranjan et al. 2017): ``alpha_low = log(p·(C − 2) / (1 − p))``."""
    return math.log(probability * (num_classes - 2) / (1 - probability))


class L2Softmax(Softmax):
    """L2-constrained softmax (Ranjan et al., 2017): features rescaled to norm alpha, then a
    plain linear classifier. alpha fixed (paper: 16–64) or learnt (``learn_alpha``)."""

    def __init__(self, alpha: float = 32.0, learn_alpha: bool = False, bias: bool = True):
        super().__init__(bias)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)), requires_grad=learn_alpha)

    def bind(self, num_classes: int) -> None:
        low = l2_softmax_alpha_low(num_classes) if num_classes > 2 else 0.0
        alpha = float(self.alpha)
        if not self.alpha.requires_grad and alpha < low:
            log.warning(
                "L2-Softmax alpha=%.1f is below alpha_low=%.1f for %d classes (p=0.9): the "
                "classifier cannot become confident; raise loss.alpha", alpha, low, num_classes,
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha.float() * F.normalize(x, dim=1)

    def state_metrics(self) -> dict[str, torch.Tensor]:
        return {"alpha": self.alpha.detach()}


class NormFace(Margin):
    """NormFace (Wang et al., ACM MM 2017): ``logit_j = s·cos_j`` with s fixed or learnt.

    ``agent_loss`` adds the paper's metric losses on the class centers as agents (unit
    vectors, ``d = |x̃ − W̃|²``): ``"contrastive"``: ``d_y + Σ_{j≠y} max(0, m − d_j)`` (m=1);
    ``"triplet"``: ``Σ_{j≠y} max(0, m + d_y − d_j)`` (m=0.8), averaged over the batch. The
    agent losses sum over every class, so with one they need the full class-center store.
    """

    def __init__(
        self,
        scale: float = 30.0,
        learn_scale: bool = False,
        agent_loss: str | None = None,
        agent_margin: float | None = None,
        agent_weight: float = 1.0,
    ):
        super().__init__(scale)
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learn_scale)
        if agent_loss not in (None, "contrastive", "triplet"):
            raise ValueError(
                f"agent_loss must be null, 'contrastive' or 'triplet', got {agent_loss!r}"
            )
        self.agent_loss = agent_loss
        default_margin = {"contrastive": 1.0, "triplet": 0.8}.get(agent_loss)
        self.agent_margin = default_margin if agent_margin is None else agent_margin
        self.agent_weight = agent_weight
        if agent_loss is not None:
            self.stores = ("full",)
            self.fused = False  # the agent losses need the (N, C) cosines with their gradient

    def logit_scale(self, norms: torch.Tensor, center_norms: torch.Tensor) -> torch.Tensor:
        return self.scale.float()

    def extra_term(self, c: CenterCosines) -> torch.Tensor | None:
        if self.agent_loss is None:
            return None
        return self.agent_weight * self._agent_loss(c.cos, c.index)

    def _agent_loss(self, cos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        distance = 2.0 - 2.0 * cos  # |x̃ − W̃_j|² for unit vectors
        d_y = distance.gather(1, index)
        negative = torch.ones_like(distance, dtype=torch.bool).scatter(1, index, False)
        if self.agent_loss == "contrastive":
            hinge = F.relu(self.agent_margin - distance)
            return (d_y.squeeze(1) + (hinge * negative).sum(dim=1)).mean()
        hinge = F.relu(self.agent_margin + d_y - distance)
        return (hinge * negative).sum(dim=1).mean()

    def state_metrics(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale.detach()}
