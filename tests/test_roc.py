"""ROC curve, TAR@FAR and EER against hand-worked cases, brute force and scipy; the ROC plot."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy.interpolate import interp1d
from scipy.optimize import brentq

from facetrain.evaluation import (
    equal_error_rate,
    kfold_verification,
    roc_auc,
    roc_curve,
    tar_at_far,
)
from facetrain.evaluation.plots import plot_roc

# Sorted high to low: 0.9 same, 0.8 same, 0.8 different (a tie), 0.3 same, 0.1 different.
SCORES = np.array([0.3, 0.8, 0.1, 0.9, 0.8])
SAME = np.array([True, True, False, True, False])


def brute_force_tar_at_far(scores, same, far_target):
    """Best TAR over every threshold t (accept score >= t) whose FAR <= far_target."""
    best = 0.0
    for t in np.append(np.unique(scores), np.inf):
        accepted = scores >= t
        if accepted[~same].mean() <= far_target + 1e-12:
            best = max(best, accepted[same].mean())
    return best


def scipy_eer(far, tar):
    """insightface's IJB evaluation: brentq on the linearly interpolated ROC curve."""
    curve = interp1d(far, tar)
    return brentq(lambda x: 1.0 - x - curve(x), 0.0, 1.0)


def test_roc_curve_hand_computed_with_a_tie():
    far, tar, thresholds = roc_curve(SCORES, SAME)
    # 3 same pairs, 2 different; the tied 0.8s (one same, one different) enter together.
    np.testing.assert_allclose(far, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tar, [0, 1 / 3, 2 / 3, 1, 1])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.9, 0.8, 0.3, 0.1])
    # Trapezoids: 0.5 * (1/3 + 2/3) / 2 + 0.5 * 1 = 0.75 = P(same outscores different, ties 1/2).
    assert np.trapezoid(tar, far) == pytest.approx(0.75)
    assert roc_auc(SCORES, SAME) == pytest.approx(0.75)


def test_eer_hand_computed():
    # 1 - TAR - FAR is 2/3 at (0, 1/3) and -1/6 at (0.5, 2/3): it crosses 0 at 0.8 of the way,
    # FAR = 0.4 and TAR = 1/3 + 0.8 / 3 = 0.6, so FAR = FRR = 0.4.
    assert equal_error_rate(SCORES, SAME) == pytest.approx(0.4)


def test_tar_at_far_hand_computed_and_unsupported_targets():
    # FAR 0.5 allows 1 of the 2 different pairs: the lowest such threshold is 0.3, TAR 1.
    assert tar_at_far(SCORES, SAME, 0.5) == pytest.approx((1.0, 0.3))
    # FAR 0.1 would need >= 10 different pairs to be measurable: not reported.
    assert tar_at_far(SCORES, SAME, 0.1) is None


def test_all_same_scores():
    scores = np.full(20, 0.7)
    same = np.arange(20) < 10
    far, tar, thresholds = roc_curve(scores, same)
    np.testing.assert_array_equal(far, [0, 1])
    np.testing.assert_array_equal(tar, [0, 1])
    assert thresholds[0] == np.inf and thresholds[1] == 0.7
    assert roc_auc(scores, same) == 0.5
    assert equal_error_rate(scores, same) == 0.5
    # Accepting anything accepts all 10 different pairs: at FAR <= 0.1 nothing is accepted.
    assert tar_at_far(scores, same, 0.1) == (0.0, np.inf)


def test_perfect_separation():
    same = np.arange(2000) % 2 == 0
    scores = np.where(same, 0.9, 0.1) + np.linspace(0, 0.01, 2000)
    assert equal_error_rate(scores, same) == 0.0
    assert tar_at_far(scores, same, 1e-3)[0] == 1.0
    result = kfold_verification(scores, same)
    assert result.tar_at_far == {"0.1": 1.0, "0.01": 1.0, "0.001": 1.0, "0.0001": None}


def test_far_target_needs_one_over_far_different_pairs():
    rng = np.random.default_rng(0)
    for negatives, supported in ((1000, True), (999, False)):
        same = np.arange(negatives + 500) >= negatives
        scores = rng.normal(size=len(same)) + same
        assert (tar_at_far(scores, same, 1e-3) is not None) == supported


def test_random_scores_with_ties_match_brute_force_and_scipy():
    rng = np.random.default_rng(1)
    for _ in range(20):
        same = rng.random(300) < 0.4
        scores = np.round(rng.normal(size=300) + 1.5 * same, 1)  # coarse: many ties
        far, tar, _ = roc_curve(scores, same)
        assert np.trapezoid(tar, far) == pytest.approx(roc_auc(scores, same), abs=1e-12)
        for target in (0.1, 0.01):
            tar_value, threshold = tar_at_far(scores, same, target)
            assert tar_value == pytest.approx(brute_force_tar_at_far(scores, same, target))
            accepted = scores >= threshold
            assert accepted[~same].mean() <= target and accepted[same].mean() == tar_value
        assert equal_error_rate(scores, same) == pytest.approx(scipy_eer(far, tar), abs=1e-9)


def test_result_is_json_friendly_and_flat_for_loggers():
    rng = np.random.default_rng(2)
    same = rng.random(400) < 0.5
    scores = rng.normal(size=400) + same
    result = kfold_verification(scores, same)
    assert result.eer == equal_error_rate(scores, same)
    assert result.tar_at_far["0.01"] == tar_at_far(scores, same, 0.01)[0]
    as_json = json.loads(json.dumps(result.as_dict()))
    assert as_json["tar_at_far"]["0.01"] == result.tar_at_far["0.01"]
    assert as_json["tar_at_far"]["0.001"] is None  # ~200 different pairs: FAR 1e-3 unsupported
    scalars = result.scalars()
    assert "tar@far=0.01" in scalars and "tar@far=0.001" not in scalars
    assert all(isinstance(value, float) for value in scalars.values())


def curve_pixels(image: np.ndarray, colour: str) -> int:
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image[..., :3].astype(int) - rgb).sum(axis=-1) < 40).sum())


def test_roc_plot_is_a_png_with_one_log_scale_curve_per_label(tmp_path):
    rng = np.random.default_rng(3)
    curves = {}
    for label, separation in (("good model", 3.0), ("weak model", 0.5)):
        same = rng.random(2000) < 0.5
        far, tar, _ = roc_curve(rng.normal(size=2000) + separation * same, same)
        curves[label] = (far, tar)
    figure = plot_roc(curves, "test")
    axes = figure.axes[0]
    assert axes.get_xscale() == "log"
    assert [line.get_label() for line in axes.get_lines()] == ["good model", "weak model"]
    path = tmp_path / "roc.png"
    figure.savefig(path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (600, 450)
        pixels = np.asarray(image.convert("RGB"))
    # matplotlib's first two colours, C0 blue and C1 orange: both curves are drawn.
    assert curve_pixels(pixels, "#1f77b4") > 300 and curve_pixels(pixels, "#ff7f0e") > 300
