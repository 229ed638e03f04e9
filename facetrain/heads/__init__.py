"""Margins: the cosines of a batch to its class centers → logits (docs/heads.md). The class
centers themselves live in ``facetrain.classifiers``."""

from facetrain.heads.adaptive import AdaFace, MagFace
from facetrain.heads.angular import LSoftmax, SphereFace, psi
from facetrain.heads.arcface import ArcFace
from facetrain.heads.base import CenterCosines, Margin, additive_angular_margin
from facetrain.heads.combined import CombinedMargin
from facetrain.heads.cosface import CosFace
from facetrain.heads.mining import CurricularFace, MVSoftmax
from facetrain.heads.normalized import L2Softmax, NormFace
from facetrain.heads.softmax import Softmax
from facetrain.heads.subcenter import SubCenterArcFace

__all__ = [
    "AdaFace",
    "ArcFace",
    "CenterCosines",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "L2Softmax",
    "LSoftmax",
    "MVSoftmax",
    "MagFace",
    "Margin",
    "NormFace",
    "Softmax",
    "SphereFace",
    "SubCenterArcFace",
    "additive_angular_margin",
    "psi",
]
