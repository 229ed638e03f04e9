"""A fixed sample of a verification set for TensorBoard's embedding projector: image indices,
identity labels and small thumbnails."""

import numpy as np
import torch
import torch.nn.functional as F


def projector_sample(
    dataset, max_images: int, thumbnail_size: int = 32, seed: int = 0
) -> tuple[np.ndarray, list[str], torch.Tensor]:
    """Up to ``max_images`` image indices (whole identities, chosen at random but the same every
    call), their labels (the dataset's ``identities`` per image, else the image index) and
    thumbnails (N, 3, size, size) in [0, 1] for the projector's sprite."""
    rng = np.random.default_rng(seed)
    identities = getattr(dataset, "identities", None)
    if identities is None:
        indices = np.sort(rng.permutation(len(dataset))[:max_images])
        labels = [str(i) for i in indices]
    else:
        identities = np.asarray([str(identity) for identity in identities])
        chosen = []
        for identity in rng.permutation(np.unique(identities)):
            chosen.extend(np.flatnonzero(identities == identity))
            if len(chosen) >= max_images:
                break
        indices = np.asarray(chosen[:max_images])
        labels = list(identities[indices])
    thumbnails = torch.stack([_thumbnail(dataset[int(i)][0], thumbnail_size) for i in indices])
    return indices, labels, thumbnails


def _thumbnail(image, size: int) -> torch.Tensor:
    """A normalised (C, H, W) image back in [0, 1] (per-image min–max; for display only)."""
    image = torch.as_tensor(image, dtype=torch.float32)
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-6)
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[0]
