"""Face verification from pair scores: LFW-protocol k-fold accuracy, best threshold, ROC curve,
ROC AUC, TAR at fixed FAR and the equal error rate.

The protocol (Huang et al., LFW technical report; as insightface evaluates it): the pairs are cut
into 10 consecutive folds; for each fold the threshold that maximises accuracy on the other 9 is
applied to it; the result is the mean ± std of the 10 held-out accuracies. The ROC metrics (as
IJB-B/C report them) are over all pairs: a pair is accepted when its score >= a threshold;
TAR = accepted same pairs / same pairs, FAR = accepted different pairs / different pairs.
"""

from dataclasses import asdict, dataclass, field

import numpy as np

FAR_TARGETS = (1e-1, 1e-2, 1e-3, 1e-4)


@dataclass(frozen=True)
class VerificationResult:
    accuracy: float  # mean held-out accuracy over the folds
    accuracy_std: float
    threshold: float  # mean of the thresholds chosen on the training folds
    auc: float  # area under the ROC curve over all pairs
    num_pairs: int
    eer: float = float("nan")  # equal error rate: FAR where FAR = 1 - TAR
    # TAR at each FAR target ("0.001": 0.93), None where the set has < 1/FAR different pairs.
    tar_at_far: dict[str, float | None] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def scalars(self) -> dict[str, float]:
        """Flat numbers for a metrics logger: ``tar@far=0.001`` etc.; unsupported FARs left out."""
        values = {k: v for k, v in self.as_dict().items() if k != "tar_at_far"}
        values.update(
            {f"tar@far={far}": tar for far, tar in self.tar_at_far.items() if tar is not None}
        )
        return {k: float(v) for k, v in values.items()}


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


def roc_curve(scores, same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact ROC curve: (FAR, TAR, threshold) at every distinct score, highest first.

    Point i accepts pairs with score >= threshold[i]; the first point (threshold +inf) accepts
    none. Tied scores are accepted together, so a tie is one (diagonal) step; the trapezoidal
    area under these points equals ``roc_auc``.
    """
    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_same = scores[order], same[order]
    # The last position of each run of equal scores: everything up to it is accepted.
    ends = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    true_accepts = np.cumsum(sorted_same)[ends]
    false_accepts = (ends + 1) - true_accepts
    tar = np.concatenate([[0], true_accepts]) / max(int(same.sum()), 1)
    far = np.concatenate([[0], false_accepts]) / max(int((~same).sum()), 1)
    thresholds = np.concatenate([[np.inf], sorted_scores[ends]])
    return far, tar, thresholds


def tar_at_far(scores, same, far_target: float) -> tuple[float, float] | None:
    """(TAR, threshold) at the lowest threshold whose FAR <= ``far_target``, without
    interpolation; None when the set has fewer than 1/far_target different pairs (then only
    FAR = 0 is measurable and the number would say nothing about this FAR)."""
    negatives = int((~np.asarray(same, dtype=bool)).sum())
    if negatives * far_target < 1 - 1e-9:
        return None
    far, tar, thresholds = roc_curve(scores, same)
    allowed = np.floor(far_target * negatives + 1e-9)  # false accepts within the target
    last = np.flatnonzero(np.rint(far * negatives) <= allowed)[-1]  # FAR rises along the curve
    return float(tar[last]), float(thresholds[last])


def equal_error_rate(scores, same) -> float:
    """The FAR where FAR = FRR = 1 - TAR, on the ROC curve linearly interpolated between its
    points (as ``brentq(lambda x: 1 - x - interp1d(far, tar)(x), 0, 1)`` in insightface's IJB
    evaluation, solved exactly on the segment where the sign changes)."""
    far, tar, _ = roc_curve(scores, same)
    gap = 1.0 - tar - far  # falls from 1 at (0, 0) to -1 at (1, 1), never rises
    i = int(np.flatnonzero(gap <= 0)[0])
    if gap[i] == 0:
        return float(far[i])
    t = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(far[i - 1] + t * (far[i] - far[i - 1]))


def kfold_verification(
    scores, same, num_folds: int = 10, far_targets=FAR_TARGETS
) -> VerificationResult:
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
        eer=equal_error_rate(scores, same),
        tar_at_far={f"{far:g}": _first(tar_at_far(scores, same, far)) for far in far_targets},
    )


def _first(pair: tuple[float, float] | None) -> float | None:
    return None if pair is None else pair[0]
