"""Sub-center ArcFace (Deng et al., ECCV 2020): K centers per class; a sample's cosine to a
class is its cosine to the nearest of the K, so noisy images gather at non-dominant centers."""

import torch
from torch import nn

from facetrain.heads.arcface import ArcFace
from facetrain.heads.base import cosine_to_centers


class SubCenterArcFace(ArcFace):
    """ArcFace on ``max_k cos(x, W_{j,k})``; paper: K=3, s=64, m=0.5.

    ``weight`` is (num_classes · K, embedding_size), class-major: the rows of class j are
    ``j·K … j·K + K − 1``, as in insightface (``weight.view(C, K, D)`` recovers them).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float = 64.0,
        margin: float = 0.5,
        subcenters: int = 3,
    ):
        super().__init__(embedding_size, num_classes, scale, margin)
        self.subcenters = subcenters
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        cos = cosine_to_centers(x, self.weight)
        return cos.view(-1, self.num_classes, self.subcenters).amax(dim=2)
