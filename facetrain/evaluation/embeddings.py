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
def evaluate_pairs(
    backbone: nn.Module, loader: DataLoader, flip: bool = False, device: str | torch.device = "cpu"
) -> VerificationResult:
    """Verify the pairs of a ``PairListDataset`` loader with ``backbone``'s embeddings
    (computed in eval mode; the backbone's mode is restored afterwards)."""
    dataset = loader.dataset
    was_training = backbone.training
    backbone.eval()
    embeddings = None
    for images, indices in loader:
        batch = embed(backbone, images.to(device), flip)
        if embeddings is None:
            embeddings = batch.new_zeros(len(dataset), batch.shape[1])
        embeddings[indices.to(device)] = batch
    backbone.train(was_training)
    return kfold_verification(pair_scores(embeddings, dataset.pairs), dataset.same)
