"""Focal loss (Lin et al., ICCV 2017) on a classification head's cross-entropy."""

import torch


def focal_loss(cross_entropy: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean of ``−(1 − p)^γ · log p`` from each row's cross-entropy ``−log p`` (rows,).

    Written on the per-row cross-entropy, so it applies to every head and to every class-center
    store (Partial-FC's sharded cross-entropy gives the same per-row values on every rank).
    ``γ = 0`` returns the mean cross-entropy itself; the CurricularFace paper compares γ=2 as
    the soft-mining baseline."""
    if gamma == 0:
        return cross_entropy.mean()
    # 1 − p = −expm1(−CE): exact for confident rows, where 1 − exp(−CE) would round to 0.
    weight = (-torch.expm1(-cross_entropy)).clamp_min(1e-12) ** gamma
    return (weight * cross_entropy).mean()
