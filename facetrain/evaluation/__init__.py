"""Verification metrics computed from embeddings."""

from facetrain.evaluation.embeddings import embed, evaluate_pairs, pair_scores
from facetrain.evaluation.verification import (
    VerificationResult,
    best_threshold,
    kfold_verification,
    roc_auc,
)

__all__ = [
    "VerificationResult",
    "best_threshold",
    "embed",
    "evaluate_pairs",
    "kfold_verification",
    "pair_scores",
    "roc_auc",
]
