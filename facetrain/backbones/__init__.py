"""Backbones: face image batch (N, 3, H, W) → embeddings (N, D).

Every backbone is a :class:`Backbone`: it takes ``embedding_size``, ``input_size`` (H, W) and
``fp16``, exposes them as attributes, and has a ``body`` (images → features) and an
``embedding`` (features → embedding); ``configs/backbone/*.yaml`` name one each, and
``create(name, **overrides)`` builds one by that name.
"""

from facetrain.backbones.complexity import count_macs, count_parameters
from facetrain.backbones.configs import available, create, load_config
from facetrain.backbones.iresnet import IResNet
from facetrain.backbones.layers import Backbone
from facetrain.backbones.mobilefacenet import ArcFaceMobileFaceNet, MobileFaceNet
from facetrain.backbones.resnet import TorchvisionResNet
from facetrain.backbones.sphereface import SphereNet
from facetrain.backbones.timm_backbone import TimmBackbone

__all__ = [
    "ArcFaceMobileFaceNet",
    "Backbone",
    "IResNet",
    "MobileFaceNet",
    "SphereNet",
    "TimmBackbone",
    "TorchvisionResNet",
    "available",
    "count_macs",
    "count_parameters",
    "create",
    "load_config",
]
