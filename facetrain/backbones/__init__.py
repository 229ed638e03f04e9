"""Backbones: face image batch (N, 3, H, W) → embeddings (N, D).

Every backbone takes ``embedding_size`` and ``input_size`` (H, W) and exposes
``.embedding_size``; ``configs/backbone/*.yaml`` name one each.
"""

from facetrain.backbones.complexity import count_macs, count_parameters
from facetrain.backbones.iresnet import IResNet
from facetrain.backbones.mobilefacenet import MobileFaceNet
from facetrain.backbones.resnet import TorchvisionResNet
from facetrain.backbones.sphereface import SphereNet
from facetrain.backbones.timm_backbone import TimmBackbone

__all__ = [
    "IResNet",
    "MobileFaceNet",
    "SphereNet",
    "TimmBackbone",
    "TorchvisionResNet",
    "count_macs",
    "count_parameters",
]
