"""Verification metrics computed from embeddings; IJB-B/C template protocols."""

from facetrain.evaluation.embeddings import embed, embed_dataset, evaluate_pairs, pair_scores
from facetrain.evaluation.ijb import (
    IJBProtocol,
    evaluate_ijb,
    identification_metrics,
    open_ijb,
    template_features,
)
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
    "IJBProtocol",
    "VerificationResult",
    "best_threshold",
    "embed",
    "embed_dataset",
    "equal_error_rate",
    "evaluate_ijb",
    "evaluate_pairs",
    "identification_metrics",
    "kfold_verification",
    "open_ijb",
    "pair_scores",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "template_features",
]
