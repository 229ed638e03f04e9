"""Backbones: face image batch (N, 3, H, W) → embeddings (N, D)."""

from facetrain.backbones.mobilefacenet import MobileFaceNet

__all__ = ["MobileFaceNet"]
