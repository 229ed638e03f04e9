"""CosFace / AM-Softmax (Wang et al., CVPR 2018; Wang et al., SPL 2018): additive cosine margin,
``T(cos_y) = cos_y − m``."""

import torch

from facetrain.heads.base import Margin


class CosFace(Margin):
    """Large-margin cosine loss; CosFace paper: s=64, m=0.35 (AM-Softmax: s=30, m=0.35)."""

    def __init__(self, scale: float = 64.0, margin: float = 0.35):
        super().__init__(scale)
        self.margin = margin

    def target_logit(self, cos_y: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        return cos_y - self.margin
