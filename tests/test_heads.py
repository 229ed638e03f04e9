"""Margin heads against independent float64 computations of the formulas in docs/heads.md."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from full_head import full_head
from helpers import margin_configs
from hydra.utils import instantiate
from omegaconf import OmegaConf

from facetrain.heads import ArcFace, Margin, Softmax

LOSS_CONFIGS = margin_configs()  # every margin head of configs/loss/


def unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def arcface_reference(x, w, labels, scale, margin, easy_margin=False):
    """ArcFace logits in float64 with an explicit acos, the way the paper writes them.

    Returns the logits and a boolean mask of the samples that took the fallback branch.
    """
    cos = unit_rows(x.astype(np.float64)) @ unit_rows(w.astype(np.float64)).T
    rows = np.arange(len(labels))
    cos_y = cos[rows, labels]
    theta_y = np.arccos(np.clip(cos_y, -1.0, 1.0))
    if easy_margin:
        fallback = cos_y <= 0
        target = np.where(fallback, cos_y, np.cos(theta_y + margin))
    else:
        fallback = theta_y > math.pi - margin
        target = np.where(fallback, cos_y - margin * math.sin(margin), np.cos(theta_y + margin))
    logits = cos.copy()
    logits[rows, labels] = target
    return scale * logits, fallback


def at_angle(direction: np.ndarray, angle: float, rng: np.random.Generator) -> np.ndarray:
    """A vector at ``angle`` radians from ``direction`` (any length, any dimension >= 2)."""
    u = direction / np.linalg.norm(direction)
    other = rng.normal(size=u.shape)
    other -= (other @ u) * u
    other /= np.linalg.norm(other)
    return rng.uniform(0.5, 3.0) * (math.cos(angle) * u + math.sin(angle) * other)


def make_arcface(weight: np.ndarray, **kwargs) -> ArcFace:
    head = full_head(ArcFace(**kwargs), weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
    return head


def angle_batch(rng, weight, labels, angles):
    """Embeddings whose angle to their class center ``weight[label]`` is ``angles`` (radians)."""
    return np.stack([at_angle(weight[y], a, rng) for y, a in zip(labels, angles, strict=True)])


@pytest.mark.parametrize("margin", [0.5, 0.3])
def test_arcface_logits_match_acos_reference_on_both_branches(margin):
    rng = np.random.default_rng(0)
    num_classes, dim, scale = 7, 16, 64.0
    weight = rng.normal(size=(num_classes, dim)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=40)
    # Random embeddings, plus some placed deliberately beyond pi - m (the fallback branch),
    # including exactly antiparallel to W_y, and some on the margin branch.
    x = rng.normal(size=(40, dim))
    beyond = np.array([math.pi - margin + 0.05, 3.0, math.pi - 0.01, math.pi])
    x[:4] = angle_batch(rng, weight, labels[:4], beyond)
    x[3] = -2.5 * weight[labels[3]]
    x[4:8] = angle_batch(rng, weight, labels[4:8], [0.1, 1.0, 2.0, math.pi - margin - 0.05])
    x = x.astype(np.float32)

    head = make_arcface(weight, scale=scale, margin=margin)
    logits = head(torch.from_numpy(x), torch.from_numpy(labels))
    expected, fallback = arcface_reference(x, weight, labels, scale, margin)

    assert fallback[:4].all() and not fallback[4:8].any()  # both branches are exercised
    assert logits.shape == (40, num_classes)
    np.testing.assert_allclose(logits.detach().numpy(), expected, rtol=0, atol=2e-3)


def test_arcface_non_target_logits_are_scaled_cosines():
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(5, 8)).astype(np.float32)
    x = rng.normal(size=(6, 8)).astype(np.float32)
    labels = rng.integers(0, 5, size=6)
    logits = make_arcface(weight, scale=30.0, margin=0.4)(
        torch.from_numpy(x), torch.from_numpy(labels)
    )
    cos = unit_rows(x.astype(np.float64)) @ unit_rows(weight.astype(np.float64)).T
    non_target = np.ones_like(cos, dtype=bool)
    non_target[np.arange(6), labels] = False
    actual = logits.detach().numpy()[non_target]
    np.testing.assert_allclose(actual, 30.0 * cos[non_target], atol=1e-4)


def test_arcface_easy_margin_applies_margin_only_where_cosine_is_positive():
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(4, 8)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 0, 1])
    angles = [0.2, 1.2, 1.7, 2.5, math.pi - 0.2, 1.5]  # cos_y > 0 for the 1st, 2nd and last
    x = angle_batch(rng, weight, labels, angles).astype(np.float32)
    head = make_arcface(weight, scale=64.0, margin=0.5, easy_margin=True)
    logits = head(torch.from_numpy(x), torch.from_numpy(labels)).detach().numpy()
    expected, plain = arcface_reference(x, weight, labels, 64.0, 0.5, easy_margin=True)
    np.testing.assert_allclose(logits, expected, atol=2e-3)
    assert plain.tolist() == [False, False, True, True, True, False]
    cos_y = np.cos(angles)
    # Without margin where cos_y <= 0: the target logit is exactly s * cos_y.
    np.testing.assert_allclose(logits[np.arange(6), labels][plain], 64.0 * cos_y[plain], atol=2e-3)


def test_arcface_target_logit_decreases_monotonically_over_zero_to_pi():
    margin, scale = 0.5, 64.0
    thetas = np.deg2rad(np.arange(0.0, 180.0 + 1e-9, 0.5))
    x = np.stack([np.cos(thetas), np.sin(thetas)], axis=1).astype(np.float32)
    weight = np.array([[1.0, 0.0], [0.0, -1.0]], dtype=np.float32)
    labels = np.zeros(len(thetas), dtype=np.int64)
    head = make_arcface(weight, scale=scale, margin=margin)
    target = head(torch.from_numpy(x), torch.from_numpy(labels))[:, 0].detach().numpy()

    assert (thetas > math.pi - margin).any() and (thetas < math.pi - margin).any()
    assert np.all(np.diff(target) < 0), "target logit must fall strictly as theta grows"
    expected, _ = arcface_reference(x, weight, labels, scale, margin)
    # rtol: at theta = 0 the cosine is clamped to 1 - 1e-7 (finite gradients): theta ~ 0.03 deg.
    np.testing.assert_allclose(target, expected[:, 0], rtol=5e-4, atol=2e-3)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["parallel", "antiparallel"])
@pytest.mark.parametrize("easy_margin", [False, True])
def test_arcface_gradients_finite_at_cosine_exactly_plus_minus_one(sign, easy_margin):
    weight = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    # A small scale keeps the softmax unsaturated, so the loss gradient reaches cos_y.
    head = make_arcface(weight, scale=4.0, margin=0.5, easy_margin=easy_margin)
    # Exactly (anti)parallel to W_0: the un-clamped cosine is exactly +1 or -1.
    x = torch.tensor([[sign * 2.0, 0.0, 0.0], [0.0, 0.0, sign * 3.0]], requires_grad=True)
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        raw = F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).T
    assert raw[0, 0].item() == sign and raw[1, 2].item() == sign

    loss = F.cross_entropy(head(x, labels), labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(head.weight.grad).all()


def test_arcface_logits_float32_for_bfloat16_embeddings_and_under_autocast():
    torch.manual_seed(0)
    head = full_head(ArcFace(), 32, 10)
    x = torch.randn(8, 32).bfloat16()
    labels = torch.randint(0, 10, (8,))

    reference = head(x, labels)
    assert reference.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x, labels)
        float_input_logits = head(x.float(), labels)
    assert logits.dtype == torch.float32
    assert float_input_logits.dtype == torch.float32
    # float32 math inside autocast: bf16 cosines at s=64 would be off by ~0.1 or more.
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-4)
    torch.testing.assert_close(float_input_logits, reference, rtol=0, atol=1e-4)


def test_head_weight_is_class_center_matrix():
    assert full_head(ArcFace(), 24, 11).weight.shape == (11, 24)
    assert full_head(Softmax(), 24, 11).weight.shape == (11, 24)


@pytest.mark.parametrize("bias", [True, False])
def test_softmax_logits_are_linear_layer(bias):
    rng = np.random.default_rng(3)
    head = full_head(Softmax(bias=bias), 6, 4)
    weight = rng.normal(size=(4, 6)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        if bias:
            head.bias.copy_(torch.from_numpy(b))
    x = rng.normal(size=(5, 6)).astype(np.float32)
    logits = head(torch.from_numpy(x), torch.zeros(5, dtype=torch.long)).detach().numpy()
    expected = x.astype(np.float64) @ weight.astype(np.float64).T + (b if bias else 0.0)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    if not bias:
        assert head.bias is None
        assert [name for name, _ in head.named_parameters()] == ["centers.weight"]


def test_softmax_logits_float32_under_autocast():
    head = full_head(Softmax(), 16, 5)
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x.bfloat16(), torch.zeros(3, dtype=torch.long))
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("config", LOSS_CONFIGS, ids=lambda p: p.stem)
def test_every_loss_config_instantiates_a_working_head(config):
    head = full_head(instantiate(OmegaConf.load(config)), 12, 5)
    assert isinstance(head.rule, Margin)
    # Sub-center ArcFace keeps K centers per class, class-major (insightface's layout).
    assert head.weight.shape == (5 * getattr(head, "subcenters", 1), 12)
    labels = torch.tensor([0, 4, 2])
    logits = head(torch.randn(3, 12), labels)
    assert logits.shape == (3, 5) and logits.dtype == torch.float32
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    assert torch.isfinite(head.weight.grad).all()


def test_loss_configs_exist():
    assert {p.stem for p in LOSS_CONFIGS} >= {"arcface", "softmax"}


def planar_arcface() -> ArcFace:
    """Three class centers in the plane at 0, 40 and 180 degrees (different norms)."""
    angles = np.deg2rad([0.0, 40.0, 180.0])
    norms = np.array([3.0, 0.5, 2.0])[:, None]
    weight = (norms * np.stack([np.cos(angles), np.sin(angles)], axis=1)).astype(np.float32)
    return make_arcface(weight, scale=64.0, margin=0.5)


def planar(degrees, length=1.0) -> torch.Tensor:
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return torch.from_numpy(length * np.stack([np.cos(radians), np.sin(radians)], 1)).float()


def test_statistics_hand_constructed_case():
    head = planar_arcface()
    # Label 0 (center at 0 deg) for all; class 1 sits at 40 deg.
    #  at 10 deg: cos(10+28.65)=0.781 < cos(30)=0.866 -> hard, un-margined argmax still right
    #  at  0 deg: cos(28.65)=0.878 > cos(40)=0.766   -> not hard, right
    #  at 45 deg: nearest center is class 1 (5 deg)  -> hard, wrong
    x = planar([10.0, 0.0, 45.0], length=2.0)
    labels = torch.tensor([0, 0, 0])
    stats = head.statistics(x, labels)

    assert stats["accuracy"].item() == pytest.approx(2 / 3)
    assert stats["hard_negative_fraction"].item() == pytest.approx(2 / 3)
    np.testing.assert_allclose(stats["theta_y"].numpy(), [10.0, 0.0, 45.0], atol=0.05)
    np.testing.assert_allclose(stats["theta_max_negative"].numpy(), [30.0, 40.0, 5.0], atol=1e-3)
    expected_cos_neg = np.cos(np.deg2rad([30.0, 40.0, 5.0])).mean()
    assert stats["cos_max_negative"].item() == pytest.approx(expected_cos_neg, abs=1e-6)


def test_statistics_accuracy_is_unmargined_argmax():
    head = planar_arcface()
    # Every sample is closer to its own center than to any other, but within the margin:
    # with the margin applied the target would lose, without it it wins.
    x = planar([15.0, 18.0, 25.0, 160.0])
    labels = torch.tensor([0, 0, 1, 2])
    logits = head(x, labels)
    assert (logits.argmax(dim=1) != labels).sum() >= 2  # the margin flips several of them
    stats = head.statistics(x, labels)
    assert stats["accuracy"].item() == 1.0


def test_statistics_theta_y_matches_acos_of_cosine():
    rng = np.random.default_rng(4)
    weight = rng.normal(size=(6, 10)).astype(np.float32)
    x = rng.normal(size=(20, 10)).astype(np.float32)
    labels = rng.integers(0, 6, size=20)
    stats = make_arcface(weight).statistics(torch.from_numpy(x), torch.from_numpy(labels))
    cos = unit_rows(x.astype(np.float64)) @ unit_rows(weight.astype(np.float64)).T
    rows = np.arange(20)
    accuracy = np.mean(cos.argmax(axis=1) == labels)
    theta_y = np.degrees(np.arccos(cos[rows, labels]))
    cos[rows, labels] = -np.inf
    theta_neg = np.degrees(np.arccos(cos.max(axis=1)))
    np.testing.assert_allclose(stats["theta_y"].numpy(), theta_y, atol=1e-3)
    np.testing.assert_allclose(stats["theta_max_negative"].numpy(), theta_neg, atol=1e-3)
    assert stats["accuracy"].item() == pytest.approx(accuracy)
