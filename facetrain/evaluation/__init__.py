"""Verification metrics computed from embeddings."""

from facetrain.evaluation.embeddings import embed, embed_dataset, evaluate_pairs, pair_scores
from facetrain.evaluation.verification import (
    FAR_TARGETS,
    VerificationResult,
    best_threshold,
    equal_error_rate,
    kfold_verification,
    roc_auc,
    roc_curve,
    tar_at_far,
)

__all__ = [
    "FAR_TARGETS",
    "VerificationResult",
    "best_threshold",
    "embed",
    "embed_dataset",
    "equal_error_rate",
    "evaluate_pairs",
    "kfold_verification",
    "pair_scores",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
]
