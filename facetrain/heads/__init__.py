"""Margin heads: embeddings and labels → logits for cross-entropy (see heads.md)."""

from facetrain.heads.adaptive import AdaFace, MagFace
from facetrain.heads.angular import LSoftmax, SphereFace, psi
from facetrain.heads.arcface import ArcFace
from facetrain.heads.base import CosineMarginHead, additive_angular_margin
from facetrain.heads.combined import CombinedMargin
from facetrain.heads.cosface import CosFace
from facetrain.heads.mining import CurricularFace, MVSoftmax
from facetrain.heads.normalized import L2Softmax, NormFace
from facetrain.heads.softmax import Softmax
from facetrain.heads.subcenter import SubCenterArcFace

__all__ = [
    "AdaFace",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "CosineMarginHead",
    "CurricularFace",
    "L2Softmax",
    "LSoftmax",
    "MVSoftmax",
    "MagFace",
    "NormFace",
    "Softmax",
    "SphereFace",
    "SubCenterArcFace",
    "additive_angular_margin",
    "psi",
]
