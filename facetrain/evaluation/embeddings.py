"""Embeddings for evaluation: optional flip-test fusion and pair scores."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from facetrain.evaluation.verification import VerificationResult, kfold_verification


def embed(backbone: nn.Module, images: torch.Tensor, flip: bool) -> torch.Tensor:
    """Embeddings (N, D) in float32; with ``flip`` the sum of the image's and its mirror's."""
    embeddings = backbone(images).float()
    if flip:
        embeddings = embeddings + backbone(torch.flip(images, dims=[3])).float()
    return embeddings


def pair_scores(embeddings: torch.Tensor, pairs: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair (P, 2) of rows of ``embeddings``."""
    unit = F.normalize(embeddings.float(), dim=1)
    pairs = torch.as_tensor(pairs, device=unit.device)
    return (unit[pairs[:, 0]] * unit[pairs[:, 1]]).sum(dim=1).cpu().numpy()


@torch.no_grad()
def embed_dataset(
    backbone: nn.Module,
    loader: DataLoader,
    flip: bool = False,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """Embeddings (N, D) of a verification set's images, row i for image index i, computed in
    eval mode (the backbone's mode is restored afterwards)."""
    was_training = backbone.training
    backbone.eval()
    embeddings = None
    for images, indices in loader:
        images = images.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        batch = embed(backbone, images, flip)
        if embeddings is None:
            embeddings = batch.new_zeros(len(loader.dataset), batch.shape[1])
        embeddings[indices.to(device)] = batch
    backbone.train(was_training)
    return embeddings


def evaluate_pairs(
    backbone: nn.Module, loader: DataLoader, flip: bool = False, device: str | torch.device = "cpu"
) -> VerificationResult:
    """Verify the pairs of a verification set loader with ``backbone``'s embeddings."""
    embeddings = embed_dataset(backbone, loader, flip, device)
    return kfold_verification(pair_scores(embeddings, loader.dataset.pairs), loader.dataset.same)
