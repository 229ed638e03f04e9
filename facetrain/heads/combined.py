"""The combined margin of insightface (Deng et al., ArcFace paper, Sec. 3.3):
``T(cos_y) = cos(m1·theta_y + m2) − m3``; (m1, m2, m3) = (m, 0, 0) SphereFace-like,
(1, m, 0) ArcFace, (1, 0, m) CosFace."""

import math

import torch

from facetrain.heads.base import Margin


class CombinedMargin(Margin):
    """Combined multiplicative, additive angular and additive cosine margin; e.g. (1, 0.3, 0.2).

    Past ``theta_lim = (pi − m2) / m1`` the cosine would rise again; there the target continues
    as ``cos_y − (cos(theta_lim) + 1 + m3)``, which meets the margin curve at theta_lim and keeps
    decreasing, so the target logit is monotonic on [0, pi].
    """

    def __init__(self, scale: float = 64.0, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2):
        super().__init__(scale)
        self.m1, self.m2, self.m3 = m1, m2, m3
        self.theta_limit = min(math.pi, (math.pi - m2) / m1)
        self.fallback_shift = math.cos(self.theta_limit) - math.cos(m1 * self.theta_limit + m2) + m3

    def target_logit(self, cos_y: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        theta = torch.acos(cos_y)
        margined = torch.cos(self.m1 * theta + self.m2) - self.m3
        return torch.where(theta <= self.theta_limit, margined, cos_y - self.fallback_shift)
