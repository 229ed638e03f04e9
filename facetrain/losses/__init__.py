"""Losses on embeddings alone, without class centers (contrastive, triplet, center), and the
focal weighting of a classification head's cross-entropy. A metric loss trains on its own
(``loss=contrastive``, ``loss=triplet``) or as a weighted term beside a margin head
(``auxiliary=[center]``); see ``facetrain.losses.base``."""

from facetrain.losses.base import EmbeddingLoss, LossError, LossOutput
from facetrain.losses.center import CenterLoss
from facetrain.losses.contrastive import ContrastiveLoss
from facetrain.losses.focal import focal_loss
from facetrain.losses.triplet import TripletLoss

__all__ = [
    "CenterLoss",
    "ContrastiveLoss",
    "EmbeddingLoss",
    "LossError",
    "LossOutput",
    "TripletLoss",
    "focal_loss",
]
