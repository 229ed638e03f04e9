"""A margin on the full class-center store, called as one head: ``logits = head(x, labels)``,
``head.weight``, ``head.statistics(x, labels)``, and the margin's own attributes. The head tests
check each margin's math through it; the store and the margin are the production classes."""

import torch
from torch import nn

from facetrain.classifiers import FullClassCenters
from facetrain.heads import Margin


class FullHead(nn.Module):
    def __init__(self, margin: Margin, embedding_size: int, num_classes: int):
        super().__init__()
        self.rule = margin  # not ``margin``: several margins have a ``margin`` hyper-parameter
        self.centers = FullClassCenters(embedding_size, num_classes, margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.centers.logits(embeddings, labels, self.rule)

    def statistics(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict:
        return self.centers.statistics(embeddings, labels, self.rule)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # weight and bias live in the store, the rest in the margin
            centers = super().__getattr__("centers")
            if name in ("weight", "bias", "num_classes", "embedding_size"):
                return getattr(centers, name)
            return getattr(super().__getattr__("rule"), name)


def full_head(margin: Margin, embedding_size: int, num_classes: int) -> FullHead:
    return FullHead(margin, embedding_size, num_classes)
