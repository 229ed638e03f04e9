"""LFW-protocol verification metrics against hand-worked cases and brute-force computations."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from facetrain.data import PairListDataset
from facetrain.data.transforms import build_transform
from facetrain.evaluation import (
    best_threshold,
    evaluate_pairs,
    kfold_verification,
    pair_scores,
    roc_auc,
)


def brute_force_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """Share of (same, different) pairs in which the same pair scores higher; ties count half."""
    positives, negatives = scores[same], scores[~same]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def best_accuracy_brute_force(scores: np.ndarray, same: np.ndarray) -> float:
    """Best accuracy any threshold ``score > t`` reaches (t below, between and above scores)."""
    distinct = np.unique(scores)
    candidates = np.concatenate(
        [[distinct[0] - 1], (distinct[1:] + distinct[:-1]) / 2, [distinct[-1] + 1]]
    )
    return max(np.mean((scores > t) == same) for t in candidates)


def test_best_threshold_separable_is_halfway_between_classes():
    scores = np.array([0.9, 0.1, 0.6, 0.2])
    same = np.array([True, False, True, False])
    assert best_threshold(scores, same) == pytest.approx(0.4)  # halfway between 0.2 and 0.6


def test_best_threshold_never_splits_tied_scores():
    # The tied 0.5s hold one different and one same pair; no threshold can separate them.
    scores = np.array([0.3, 0.5, 0.5, 0.5, 0.8])
    same = np.array([False, True, True, False, True])
    # Cut at 0.4 (between 0.3 and 0.5): 4/5 right. Cut at 0.65: 3/5 right.
    assert best_threshold(scores, same) == pytest.approx(0.4)


def test_best_threshold_reaches_the_best_accuracy_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        same = rng.random(40) < 0.5
        scores = rng.integers(0, 8, size=40) / 8 + 0.2 * same  # overlapping, many ties
        threshold = best_threshold(scores, same)
        achieved = np.mean((scores > threshold) == same)
        assert achieved == pytest.approx(best_accuracy_brute_force(scores, same))
        assert threshold not in scores  # always strictly between two scores


def test_perfectly_separable_scores_give_accuracy_and_auc_one():
    rng = np.random.default_rng(1)
    same = rng.random(60) < 0.5
    same[:2] = [True, False]
    scores = np.where(same, rng.uniform(0.6, 1.0, 60), rng.uniform(-1.0, 0.4, 60))
    result = kfold_verification(scores, same)
    assert result.accuracy == 1.0
    assert result.accuracy_std == 0.0
    assert result.auc == 1.0
    assert result.num_pairs == 60
    assert scores[~same].max() < result.threshold < scores[same].min()


def test_all_tied_scores_give_auc_half_and_majority_rate_per_fold():
    # 20 pairs in 10 folds of 2; 14 same, 6 different. Every training split (18 pairs) has a
    # "same" majority, and a tied score allows only "all same" or "all different", so every
    # held-out fold is called all-same: its accuracy is its share of same pairs.
    folds = [[1, 1], [1, 0], [1, 1], [1, 0], [1, 1], [1, 0], [1, 1], [1, 0], [1, 1], [0, 0]]
    same = np.array(folds, dtype=bool).reshape(-1)
    scores = np.full(20, 0.3)
    fold_accuracies = [1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 1.0, 0.0]

    result = kfold_verification(scores, same)
    assert result.auc == 0.5
    assert result.accuracy == pytest.approx(np.mean(fold_accuracies))  # 0.7
    assert result.accuracy == pytest.approx(14 / 20)
    assert result.accuracy_std == pytest.approx(np.std(fold_accuracies))
    assert result.threshold < 0.3  # "same" is predicted when score > threshold


def test_kfold_hand_worked_twenty_pairs():
    # Fold k holds pairs (2k, 2k+1): a same pair scoring S_k, then a different pair scoring D_k.
    #   S = 0.50 0.55 0.60 0.65 0.70 0.75 0.80 0.85 0.90 0.95
    #   D = 0.00 0.05 0.10 0.15 0.20 0.25 0.30 0.35 0.38 0.62   (D_9 = 0.62 is an outlier)
    # Held-out fold 0: training S min is 0.55, D are 0.05..0.38 plus 0.62. Cutting between 0.38
    #   and 0.55 errs once (0.62); cutting above 0.62 errs twice (0.55, 0.60) -> t = 0.465.
    #   S_0 = 0.50 > 0.465 right, D_0 = 0.00 right -> 1.0.
    # Held-out folds 1..7: training S min 0.50, regular D max 0.38 -> t = (0.38 + 0.50) / 2 = 0.44
    #   (cutting above 0.62 errs 2 or 3 times). Both held-out pairs right -> 1.0.
    # Held-out fold 8: D_8 = 0.38 is held out, the regular D max is 0.35 -> t = 0.425.
    #   S_8 = 0.90 right, D_8 = 0.38 < 0.425 right -> 1.0.
    # Held-out fold 9: training is separable, D max 0.38, S min 0.50 -> t = 0.44.
    #   S_9 = 0.95 right, D_9 = 0.62 > 0.44 wrong -> 0.5.
    # Accuracy: (9 * 1.0 + 0.5) / 10 = 0.95; std: sqrt((9 * 0.05^2 + 0.45^2) / 10) = 0.15.
    # Threshold: (0.465 + 7 * 0.44 + 0.425 + 0.44) / 10 = 0.441.
    # AUC: 100 (same, different) pairs, D_9 = 0.62 beats S = 0.50, 0.55, 0.60 -> 97 / 100.
    s = np.array([0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95])
    d = np.array([0.00, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.38, 0.62])
    scores = np.stack([s, d], axis=1).reshape(-1)
    same = np.tile([True, False], 10)

    result = kfold_verification(scores, same)
    assert result.accuracy == pytest.approx(0.95)
    assert result.accuracy_std == pytest.approx(0.15)
    assert result.threshold == pytest.approx(0.441)
    assert result.auc == pytest.approx(0.97)
    assert result.num_pairs == 20
    assert result.as_dict()["accuracy"] == pytest.approx(0.95)


def test_roc_auc_matches_brute_force_pair_count_with_ties():
    rng = np.random.default_rng(2)
    for _ in range(5):
        same = rng.random(150) < 0.4
        scores = rng.integers(0, 6, size=150) / 5 + 0.3 * same  # coarse scores: many ties
        assert roc_auc(scores, same) == pytest.approx(brute_force_auc(scores, same), abs=1e-12)


def test_roc_auc_hand_computed():
    # same: 0.8, 0.4   different: 0.4, 0.1 -> pairs (0.8>0.4) (0.8>0.1) (0.4=0.4) (0.4>0.1)
    scores = np.array([0.8, 0.4, 0.4, 0.1])
    same = np.array([True, True, False, False])
    assert roc_auc(scores, same) == pytest.approx(3.5 / 4)


def test_metrics_accept_zero_one_labels_as_pair_files_write_them():
    # Pair files hold 0/1; a user passing those labels straight in must get the same answers
    # as with booleans (kfold_verification converts, the exported helpers must too).
    scores = np.array([0.9, 0.1, 0.6, 0.2, 0.7])
    flags = np.array([1, 0, 1, 0, 0])
    assert roc_auc(scores, flags) == pytest.approx(roc_auc(scores, flags == 1))  # 5/6
    assert best_threshold(scores, flags) == pytest.approx(best_threshold(scores, flags == 1))


def test_kfold_with_fewer_pairs_than_folds_raises():
    with pytest.raises(ValueError, match="9 pairs"):
        kfold_verification(np.linspace(0, 1, 9), np.arange(9) % 2 == 0)


def test_pair_scores_are_cosine_similarities():
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(7, 5)) * rng.uniform(0.1, 10, size=(7, 1))
    pairs = np.array([[0, 1], [2, 2], [6, 3], [4, 5], [1, 0]])
    scores = pair_scores(torch.from_numpy(embeddings).float(), pairs)
    a, b = embeddings[pairs[:, 0]], embeddings[pairs[:, 1]]
    expected = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert scores[1] == pytest.approx(1.0)


@pytest.fixture
def tiny_pair_set(tmp_path):
    """Six 8x8 noise images (PNG, lossless) and 12 pairs naming them by relative path."""
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    (tmp_path / "img").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "img" / f"{i}.png")
    pairs = [(0, 1, 1), (2, 3, 0), (4, 5, 1), (0, 5, 0), (1, 2, 1), (3, 4, 0),
             (0, 2, 1), (1, 3, 0), (2, 4, 1), (3, 5, 0), (5, 1, 1), (4, 0, 0)]  # fmt: skip
    lines = [f"img/{a}.png img/{b}.png {s}" for a, b, s in pairs]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.txt", images, pairs


@pytest.mark.parametrize("flip", [False, True])
def test_evaluate_pairs_matches_hand_computed_scores(tiny_pair_set, flip):
    pairs_file, images, pairs = tiny_pair_set
    transform = build_transform([], (8, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    dataset = PairListDataset(pairs_file, "tiny", transform)
    # Shuffled, uneven batches: embeddings must still land at their image's index.
    loader = DataLoader(dataset, batch_size=4, shuffle=True)
    result = evaluate_pairs(nn.Flatten(), loader, flip=flip)

    # By hand: the pair file names images 0..5 in order of first use, which is 0..5 here.
    normalised = (images.astype(np.float64) - 127.5) / 127.5  # (N, H, W, C)
    chw = normalised.transpose(0, 3, 1, 2)
    embeddings = chw.reshape(6, -1)
    if flip:  # flip-test: add the horizontally mirrored image's embedding
        embeddings = embeddings + chw[..., ::-1].reshape(6, -1)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    scores = np.array([unit[a] @ unit[b] for a, b, _ in pairs])
    same = np.array([s == 1 for _, _, s in pairs])

    expected = kfold_verification(scores, same)
    assert result.num_pairs == 12
    assert result.auc == pytest.approx(brute_force_auc(scores, same))
    assert result.accuracy == pytest.approx(expected.accuracy)
    assert result.threshold == pytest.approx(expected.threshold, abs=1e-5)
