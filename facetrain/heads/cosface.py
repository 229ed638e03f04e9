"""CosFace / AM-Softmax (Wang et al., CVPR 2018; Wang et al., SPL 2018): additive cosine margin,
``T(cos_y) = cos_y − m``."""

import torch

from facetrain.heads.base import CosineMarginHead


class CosFace(CosineMarginHead):
    """Large-margin cosine loss; CosFace paper: s=64, m=0.35 (AM-Softmax: s=30, m=0.35)."""

    def __init__(
        self, embedding_size: int, num_classes: int, scale: float = 64.0, margin: float = 0.35
    ):
        super().__init__(embedding_size, num_classes, scale)
        self.margin = margin

    def target_logit(self, cos_y: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        return cos_y - self.margin
