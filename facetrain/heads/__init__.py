"""Margin heads: embeddings and labels → logits for cross-entropy (see heads.md)."""

from facetrain.heads.arcface import ArcFace
from facetrain.heads.base import CosineMarginHead
from facetrain.heads.softmax import Softmax

__all__ = ["ArcFace", "CosineMarginHead", "Softmax"]
