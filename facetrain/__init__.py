"""facetrain: config-driven face-recognition training (backbones × margin heads)."""

__version__ = "0.1.0"
