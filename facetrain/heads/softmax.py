"""Plain softmax classifier: ``logit_j = W_j · x + b_j`` (no normalisation, no margin)."""

import torch

from facetrain.heads.base import CenterCosines, Margin


class Softmax(Margin):
    """Linear layer + softmax cross-entropy, the baseline every margin paper compares against.

    The store computes the products ``W_j·x (+ b_j)`` itself (``normalized_centers`` false);
    this margin passes them through. A plain product needs the whole class matrix and its bias,
    so it runs on the full class-center store only."""

    stores = ("full",)
    normalized_centers = False

    def __init__(self, bias: bool = True):
        super().__init__(scale=1.0)
        self.class_bias = bias

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def logits(self, c: CenterCosines) -> torch.Tensor:
        return c.cos
