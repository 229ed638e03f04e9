"""Class-center stores: the weight, the cosines of a batch to the centers held, and the
cross-entropy over them; the margins of ``facetrain.heads`` run on top (docs/heads.md)."""

from facetrain.classifiers.base import ClassCenters, ClassifierError, ClassifierOutput
from facetrain.classifiers.full import FullClassCenters
from facetrain.classifiers.partial_fc import PartialFC, shard_range

__all__ = [
    "ClassCenters",
    "ClassifierError",
    "ClassifierOutput",
    "FullClassCenters",
    "PartialFC",
    "shard_range",
]
