"""LFW-protocol face verification: k-fold accuracy, best threshold and ROC AUC from pair scores.

The protocol (Huang et al., LFW technical report; as insightface evaluates it): the pairs are cut
into 10 consecutive folds; for each fold the threshold that maximises accuracy on the other 9 is
applied to it; the result is the mean ± std of the 10 held-out accuracies.
"""

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class VerificationResult:
    accuracy: float  # mean held-out accuracy over the folds
    accuracy_std: float
    threshold: float  # mean of the thresholds chosen on the training folds
    auc: float  # area under the ROC curve over all pairs
    num_pairs: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The score threshold (predict "same" when score > threshold) of highest accuracy.

    Every distinct score is a candidate cut; the threshold returned lies halfway between the
    scores on either side of the best cut, so it generalises to unseen pairs.
    """
    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool)
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_same = scores[order], same[order]
    # Cutting after position i (0..n): pairs [0, i) are called different, [i, n) the same.
    different_below = np.concatenate([[0], np.cumsum(~sorted_same)])
    same_above = np.concatenate([[0], np.cumsum(sorted_same[::-1])])[::-1]
    correct = different_below + same_above
    # Only cut between distinct scores: equal scores must get the same decision.
    valid = np.concatenate([[True], sorted_scores[1:] > sorted_scores[:-1], [True]])
    cut = int(np.flatnonzero(valid)[np.argmax(correct[valid])])
    low = sorted_scores[cut - 1] if cut > 0 else sorted_scores[0] - 1.0
    high = sorted_scores[cut] if cut < len(scores) else sorted_scores[-1] + 1.0
    return float((low + high) / 2)


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """Probability that a same pair outscores a different one (ties count half)."""
    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based ranks, ties averaged
    ranks = average_rank[inverse]
    positives, negatives = int(same.sum()), int((~same).sum())
    return float((ranks[same].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def kfold_verification(scores, same, num_folds: int = 10) -> VerificationResult:
    """LFW-style ``num_folds``-fold verification over consecutive folds of the pairs."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    if len(scores) < num_folds:
        raise ValueError(f"{len(scores)} pairs cannot be split into {num_folds} folds")
    folds = np.array_split(np.arange(len(scores)), num_folds)
    accuracies, thresholds = [], []
    for held_out in folds:
        train = np.setdiff1d(np.arange(len(scores)), held_out, assume_unique=True)
        threshold = best_threshold(scores[train], same[train])
        accuracies.append(np.mean((scores[held_out] > threshold) == same[held_out]))
        thresholds.append(threshold)
    return VerificationResult(
        accuracy=float(np.mean(accuracies)),
        accuracy_std=float(np.std(accuracies)),
        threshold=float(np.mean(thresholds)),
        auc=roc_auc(scores, same),
        num_pairs=len(scores),
    )
