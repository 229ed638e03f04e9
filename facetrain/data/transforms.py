"""Albumentations pipelines built from config lists."""

from collections.abc import Sequence

import albumentations as A
from albumentations.pytorch import ToTensorV2


def build_transform(
    augmentations: Sequence[A.BasicTransform],
    image_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
) -> A.Compose:
    """Resize to ``image_size`` (H, W), apply ``augmentations``, normalise, make a CHW tensor."""
    height, width = image_size
    return A.Compose(
        [
            A.Resize(height, width),
            *augmentations,
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )
