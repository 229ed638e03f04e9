"""ArcFace (Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
CVPR 2019): ``T(cos_y) = cos(theta_y + m)``, every non-target logit stays ``cos_j``."""

import math

import torch

from facetrain.heads.base import CosineMarginHead


class ArcFace(CosineMarginHead):
    """Additive angular margin; paper defaults s=64, m=0.5.

    ``cos(theta + m)`` stops decreasing once ``theta + m > pi``; beyond ``theta_y > pi - m`` the
    target logit falls back to the CosFace-style ``cos_y - m·sin(m)`` (as insightface does) so it
    stays monotonic in theta. With ``easy_margin`` the margin is applied only where ``cos_y > 0``.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float = 64.0,
        margin: float = 0.5,
        easy_margin: bool = False,
    ):
        super().__init__(embedding_size, num_classes, scale)
        self.margin = margin
        self.easy_margin = easy_margin
        self.cos_m = math.cos(margin)
        self.sin_m = math.sin(margin)
        self.threshold = math.cos(math.pi - margin)
        self.fallback = margin * math.sin(margin)

    def target_logit(self, cos_y: torch.Tensor) -> torch.Tensor:
        sin_y = torch.sqrt(1.0 - cos_y * cos_y)
        cos_y_plus_m = cos_y * self.cos_m - sin_y * self.sin_m
        if self.easy_margin:
            return torch.where(cos_y > 0, cos_y_plus_m, cos_y)
        return torch.where(cos_y > self.threshold, cos_y_plus_m, cos_y - self.fallback)
