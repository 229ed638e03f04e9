"""ArcFace (Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
CVPR 2019): ``T(cos_y) = cos(theta_y + m)``, every non-target logit stays ``cos_j``."""

import torch

from facetrain.heads.base import Margin, additive_angular_margin, easy_margin


class ArcFace(Margin):
    """Additive angular margin; paper defaults s=64, m=0.5.

    ``cos(theta + m)`` stops decreasing once ``theta + m > pi``; beyond ``theta_y > pi - m`` the
    target logit falls back to the CosFace-style ``cos_y - m·sin(m)`` (as insightface does) so it
    stays monotonic in theta. With ``easy_margin`` the margin is applied only where ``cos_y > 0``.
    """

    def __init__(self, scale: float = 64.0, margin: float = 0.5, easy_margin: bool = False):
        super().__init__(scale)
        self.margin = margin
        self.easy_margin = easy_margin

    def target_logit(self, cos_y: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        target = additive_angular_margin(cos_y, self.margin)
        return easy_margin(cos_y, target) if self.easy_margin else target
