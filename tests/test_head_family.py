"""The margin-head family of docs/heads.md against independent float64 computations of each paper's
formula (explicit acos and loops, never the head's own code path), on seeded random inputs and on
constructed edge inputs. ArcFace and Softmax themselves are covered in test_heads.py."""

import copy
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from full_head import full_head
from helpers import margin_configs
from hydra.utils import instantiate
from omegaconf import OmegaConf

from facetrain.heads import (
    AdaFace,
    CombinedMargin,
    CosFace,
    CurricularFace,
    L2Softmax,
    LSoftmax,
    MagFace,
    MVSoftmax,
    NormFace,
    SphereFace,
    SubCenterArcFace,
    psi,
)

CONFIG_DIR = Path(__file__).parents[1] / "configs" / "loss"
LOSS_CONFIGS = margin_configs()  # every margin head of configs/loss/
N, D, C = 6, 8, 5
# Angles (radians) of constructed embeddings to their class center: they reach every psi piece
# for m = 2, 3, 4, both sides of pi - m for the angular margins and of the combined-margin limit.
ANGLES = (0.2, 0.9, 1.5, 2.0, 2.6, 3.0)
# Tolerances for logits at s = 64 (float32 math) and for |x|-scaled logits (SphereFace/L-Softmax).
SCALED_ATOL = 1e-3
ANNEALED_TOL = {"rtol": 2e-5, "atol": 2e-4}


# ---------------------------------------------------------------------------------------------
# Independent float64 references
# ---------------------------------------------------------------------------------------------


def unit(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def direction_at(center: np.ndarray, angle: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at ``angle`` radians from ``center``."""
    u = unit(center)
    v = rng.normal(size=u.shape)
    v -= (v @ u) * u
    return math.cos(angle) * u + math.sin(angle) * unit(v)


def batch(seed, angles=ANGLES, n_random=N, lengths=None):
    """Float32 class centers (C, D) with varied norms, labels, and embeddings: ``n_random``
    Gaussian rows, then one row at each of ``angles`` to its class center. Row norms are random
    in [0.5, 3] (Gaussian rows: times ~sqrt(D)) unless ``lengths`` gives them."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(C, D)) * rng.uniform(0.5, 2.0, size=(C, 1))
    n = n_random + len(angles)
    labels = rng.integers(0, C, size=n)
    x = rng.normal(size=(n, D))
    for i, angle in enumerate(angles, start=n_random):
        x[i] = direction_at(w[labels[i]], angle, rng)
    if lengths is None:
        x *= rng.uniform(0.5, 3.0, size=(n, 1))
    else:
        x = unit(x) * np.asarray(lengths, dtype=np.float64)[:, None]
    return x.astype(np.float32), w.astype(np.float32), labels


def cosines(x, w) -> np.ndarray:
    """(N, C) cosines in float64, one dot product at a time."""
    xu, wu = unit(x), unit(w)
    return np.array([[xu[i] @ wu[j] for j in range(len(wu))] for i in range(len(xu))])


def target_angles(x, w, labels) -> np.ndarray:
    return np.arccos(cosines(x, w)[np.arange(len(labels)), labels])


def margin_logits(cos, labels, scale, target, non_target=None) -> np.ndarray:
    """``s·T(cos_y)`` at the label, ``s·N(cos_j, T)`` (default ``s·cos_j``) elsewhere, looping."""
    out = np.empty_like(cos)
    for i, y in enumerate(labels):
        t_i = float(target(i, cos[i, y]))
        for j in range(cos.shape[1]):
            if j == y:
                out[i, j] = t_i
            elif non_target is None:
                out[i, j] = cos[i, j]
            else:
                out[i, j] = non_target(cos[i, j], t_i)
    return scale * out


def psi_ref(theta, m):
    """``(-1)^k cos(m·theta) - 2k`` with ``k = floor(theta·m/pi)`` (k = m - 1 at theta = pi)."""
    k = np.minimum(np.floor(np.asarray(theta) * m / math.pi), m - 1)
    return (-1.0) ** k * np.cos(m * np.asarray(theta)) - 2.0 * k


def arc_target(cos_y, m):
    """``cos(theta + m)``, and insightface's ``cos - m·sin(m)`` where ``theta > pi - m``."""
    theta = np.arccos(np.clip(cos_y, -1.0, 1.0))
    return np.where(theta > math.pi - m, cos_y - m * np.sin(m), np.cos(theta + m))


def annealed_reference(x, w, labels, lam, m, normalise_weight) -> np.ndarray:
    """L-Softmax (``normalise_weight=False``) / A-Softmax logits, loop by loop:
    ``|W_j||x| cos_j``, target ``|W_y||x| (lam·cos_y + psi(theta_y)) / (1 + lam)``."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    if normalise_weight:
        w64 = unit(w64)
    out = np.empty((len(x64), len(w64)))
    for i, y in enumerate(labels):
        for j in range(len(w64)):
            x_norm, w_norm = np.linalg.norm(x64[i]), np.linalg.norm(w64[j])
            cos = x64[i] @ w64[j] / (x_norm * w_norm)
            if j == y:
                cos = (lam * cos + psi_ref(np.arccos(cos), m)) / (1.0 + lam)
            out[i, j] = x_norm * w_norm * cos
    return out


def sphere_lambda(n, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0) -> float:
    return max(lambda_min, base * (1.0 + gamma * n) ** (-power))


def combined_target(cos_y, m1, m2, m3):
    theta = float(np.arccos(cos_y))
    limit = min(math.pi, (math.pi - m2) / m1)
    if theta <= limit:
        return math.cos(m1 * theta + m2) - m3
    return cos_y - (math.cos(limit) + 1.0 + m3)  # the documented continuation past the limit


def magface_margin(norms, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8):
    a = np.clip(norms, l_a, u_a)
    return l_m + (u_m - l_m) * (a - l_a) / (u_a - l_a)


def adaface_z(norms, mean, std, h=0.333):
    return np.clip(h * (np.asarray(norms) - mean) / (std + 1e-3), -1.0, 1.0)


def adaface_target(cos_y, z, m=0.4):
    # The authors' code clips the modulated angle to [eps, pi - eps].
    theta = np.clip(np.arccos(cos_y) - m * z, 0.0, math.pi)
    return np.cos(theta) - (m + m * z)


def class_cosines(head, x, w) -> np.ndarray:
    """Cosine to every class; for sub-center heads the max over the K class-major rows."""
    k_count = getattr(head, "subcenters", 1)
    rows = cosines(x, w)
    return np.array(
        [
            [max(rows[i, j * k_count + k] for k in range(k_count)) for j in range(head.num_classes)]
            for i in range(len(x))
        ]
    )


def target_ref(head, cos_y, norms) -> np.ndarray:
    """T(cos_y) of docs/heads.md (before scaling) in float64, from the head's hyper-parameters."""
    name = type(head.rule).__name__
    theta = np.arccos(np.clip(cos_y, -1.0, 1.0))
    if name in ("Softmax", "L2Softmax", "NormFace"):
        return cos_y
    if name in ("LSoftmax", "SphereFace"):
        lam = sphere_lambda(
            int(head.iteration), head.base, head.gamma, head.power, head.lambda_min
        )
        return (lam * cos_y + psi_ref(theta, head.margin)) / (1.0 + lam)
    if name == "CosFace" or (name == "MVSoftmax" and head.target == "am"):
        return cos_y - head.margin
    if name in ("ArcFace", "SubCenterArcFace", "CurricularFace", "MVSoftmax"):
        return arc_target(cos_y, head.margin)
    if name == "CombinedMargin":
        return np.array([combined_target(c, head.m1, head.m2, head.m3) for c in cos_y])
    if name == "AdaFace":
        z = adaface_z(norms, float(head.norm_mean), float(head.norm_std), head.h)
        return adaface_target(cos_y, z, head.margin)
    if name == "MagFace":
        margin = magface_margin(norms, head.l_a, head.u_a, head.l_m, head.u_m)
        return arc_target(cos_y, margin)
    raise AssertionError(f"no reference for {name}")


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def set_weight(head, w):
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(np.asarray(w, dtype=np.float32)))
    return head


def forward(head, x, labels) -> np.ndarray:
    return head(torch.from_numpy(x), torch.from_numpy(labels)).detach().double().numpy()


def build(stem, overrides, embedding_size=D, num_classes=C):
    config = OmegaConf.load(CONFIG_DIR / f"{stem}.yaml")
    return full_head(instantiate(config, **overrides), embedding_size, num_classes)


def case_id(stem, overrides):
    return "-".join([stem, *(f"{k}={v}" for k, v in overrides.items())])


VARIANTS = [
    ("mvsoftmax", {"target": "arc", "margin": 0.5}),
    ("normface", {"learn_scale": True, "agent_loss": "contrastive"}),
    ("normface", {"agent_loss": "triplet"}),
    ("l2softmax", {"learn_alpha": True}),
]
HEAD_CASES = [pytest.param(p.stem, {}, id=p.stem) for p in LOSS_CONFIGS] + [
    pytest.param(stem, kw, id=case_id(stem, kw)) for stem, kw in VARIANTS
]
HAS_EXTRA_LOSS = {"magface", "normface-learn_scale=True-agent_loss=contrastive",
                  "normface-agent_loss=triplet"}


def test_loss_configs_cover_the_head_family():
    assert {p.stem for p in LOSS_CONFIGS} >= {
        "softmax", "lsoftmax", "sphereface", "l2softmax", "normface", "cosface", "amsoftmax",
        "arcface", "combined", "mvsoftmax", "curricular", "subcenter", "adaface", "magface",
    }


# ---------------------------------------------------------------------------------------------
# 1. Logits of every head against the paper formula
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base, gamma", [(1000.0, 0.12), (4.0, 1.0)], ids=["caffe", "fast"])
@pytest.mark.parametrize("margin", [2, 3, 4])
def test_lsoftmax_annealed_logits_and_iteration_counts_optimizer_steps(margin, base, gamma):
    x, w, labels = batch(10 + margin)
    head = set_weight(full_head(LSoftmax(margin=margin, base=base, gamma=gamma), D, C), w)
    theta = target_angles(x, w, labels)
    assert set(np.floor(theta * margin / math.pi).astype(int)) == set(range(margin))

    def reference(n):
        return annealed_reference(x, w, labels, base / (1 + gamma * n), margin, False)

    head.eval()  # iteration 0: lambda = base
    np.testing.assert_allclose(forward(head, x, labels), reference(0), **ANNEALED_TOL)
    assert int(head.iteration) == 0
    head.train()
    for n in (1, 2, 3):
        # The module tells the margin the optimizer steps taken before each batch; as the Caffe
        # layer counts its first iteration 1, the n-th optimizer step uses lambda(n) — for every
        # forward of that step (gradient accumulation), not one more per forward.
        head.set_step(n - 1)
        for _ in range(2):
            logits = forward(head, x, labels)
            assert int(head.iteration) == n
            np.testing.assert_allclose(logits, reference(n), **ANNEALED_TOL)
            assert not np.allclose(logits, reference(n - 1), **ANNEALED_TOL)
    head.eval()
    np.testing.assert_allclose(forward(head, x, labels), reference(3), **ANNEALED_TOL)
    assert int(head.iteration) == 3


@pytest.mark.parametrize("margin", [2, 3, 4])
@pytest.mark.parametrize("head_class", [LSoftmax, SphereFace])
def test_un_annealed_heads_use_pure_psi(head_class, margin):
    x, w, labels = batch(20 + margin)
    margin_rule = head_class(margin=margin, base=0.0, lambda_min=0.0)
    head = set_weight(full_head(margin_rule, D, C), w).train()
    expected = annealed_reference(x, w, labels, 0.0, margin, head_class is SphereFace)
    for _ in range(2):
        np.testing.assert_allclose(forward(head, x, labels), expected, **ANNEALED_TOL)
    # Pure psi is not the softmax logit: the margin is really there.
    plain = annealed_reference(x, w, labels, 1e12, margin, head_class is SphereFace)
    assert not np.allclose(expected, plain, **ANNEALED_TOL)


def test_sphereface_defaults_normalise_weight_m4_and_lambda_floor():
    x, w, labels = batch(30)
    head = set_weight(full_head(SphereFace(), D, C), w).eval()
    # Iteration 0: lambda = base = 1000; W normalised, |x| kept.
    np.testing.assert_allclose(
        forward(head, x, labels), annealed_reference(x, w, labels, 1000.0, 4, True), **ANNEALED_TOL
    )
    head.iteration.fill_(10**6)  # 1000 / (1 + 120000) << 5: the floor lambda_min = 5 holds
    logits = forward(head, x, labels)
    floor = annealed_reference(x, w, labels, 5.0, 4, True)
    np.testing.assert_allclose(logits, floor, **ANNEALED_TOL)
    assert not np.allclose(logits, annealed_reference(x, w, labels, 5.0, 3, True), **ANNEALED_TOL)
    assert head.state_metrics()["lambda"] == 5.0


@pytest.mark.parametrize("bias", [True, False])
def test_l2softmax_logits_are_linear_on_features_rescaled_to_alpha(bias):
    x, w, labels = batch(35)
    b = np.random.default_rng(36).normal(size=C).astype(np.float32)
    head = set_weight(full_head(L2Softmax(alpha=24.0, bias=bias), D, C), w)
    if bias:
        with torch.no_grad():
            head.bias.copy_(torch.from_numpy(b))
    xu, w64 = unit(x), w.astype(np.float64)
    expected = np.array(
        [[24.0 * xu[i] @ w64[j] + (b[j] if bias else 0.0) for j in range(C)] for i in range(len(x))]
    )
    for training in (True, False):
        head.train(training)
        np.testing.assert_allclose(forward(head, x, labels), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "num_classes, alpha, learn_alpha, warns",
    [
        (100_000, 8.0, False, True),  # alpha_low = log(0.9 * 99998 / 0.1) = 13.71
        (100_000, 16.0, False, False),
        (100_000, 8.0, True, False),  # only a fixed alpha is checked
        (1_000, 9.0, False, True),  # alpha_low = 9.10: just below
        (1_000, 9.2, False, False),  # just above
        (3, 2.1, False, True),  # alpha_low = log(0.9 * 1 / 0.1) = 2.197 (C - 2, not C)
        (3, 2.3, False, False),
    ],
)
def test_l2softmax_warns_when_fixed_alpha_below_alpha_low(
    caplog, num_classes, alpha, learn_alpha, warns
):
    alpha_low = math.log(0.9 * (num_classes - 2) / (1 - 0.9))
    assert (alpha < alpha_low) == (warns or learn_alpha)
    with caplog.at_level(logging.WARNING):
        full_head(L2Softmax(alpha=alpha, learn_alpha=learn_alpha), 2, num_classes)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == int(warns)
    if warns:
        assert f"{alpha_low:.1f}" in warnings[0].getMessage()


def softmax_scale_gradient(logits, labels, unscaled) -> float:
    """d CE / d s for ``logits = s·unscaled + const``: mean_i sum_j (p_ij - [j = y_i]) u_ij."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0
    return float((p * unscaled).sum(axis=1).mean())


def test_l2softmax_learnt_alpha_gets_the_softmax_gradient():
    x, w, labels = batch(37)
    head = set_weight(full_head(L2Softmax(alpha=16.0, learn_alpha=True), D, C), w)
    F.cross_entropy(head(torch.from_numpy(x), torch.from_numpy(labels)), torch.from_numpy(labels)
                    ).backward()
    unscaled = unit(x) @ w.astype(np.float64).T
    expected = softmax_scale_gradient(16.0 * unscaled, labels, unscaled)  # bias is 0
    assert head.alpha.grad is not None
    assert head.alpha.grad.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert abs(expected) > 1e-3

    fixed = set_weight(full_head(L2Softmax(alpha=16.0), D, C), w)
    F.cross_entropy(fixed(torch.from_numpy(x), torch.from_numpy(labels)), torch.from_numpy(labels)
                    ).backward()
    assert not fixed.alpha.requires_grad and fixed.alpha.grad is None


@pytest.mark.parametrize("learn_scale", [False, True])
def test_normface_logits_are_scaled_cosines_and_learnt_scale_gets_gradient(learn_scale):
    x, w, labels = batch(40)
    head = set_weight(full_head(NormFace(scale=30.0, learn_scale=learn_scale), D, C), w).train()
    logits = head(torch.from_numpy(x), torch.from_numpy(labels))
    cos = cosines(x, w)
    np.testing.assert_allclose(logits.detach().numpy(), 30.0 * cos, rtol=0, atol=1e-4)
    assert head.extra_loss() is None  # no agent loss configured
    F.cross_entropy(logits, torch.from_numpy(labels)).backward()
    if learn_scale:
        expected = softmax_scale_gradient(30.0 * cos, labels, cos)
        assert head.scale.grad.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert abs(expected) > 1e-3
    else:
        assert not head.scale.requires_grad and head.scale.grad is None


def agent_reference(x, w, labels, kind, margin):
    """NormFace agent loss on unit vectors, d = |x~ - W~|^2, loops over j != y, batch mean.
    Also returns how many hinge terms are active and inactive."""
    xt, wt = unit(x), unit(w)
    losses, active, inactive = [], 0, 0
    for i, y in enumerate(labels):
        d = [float(np.sum((xt[i] - wt[j]) ** 2)) for j in range(len(wt))]
        loss = d[y] if kind == "contrastive" else 0.0
        for j in range(len(wt)):
            if j == y:
                continue
            hinge = margin - d[j] if kind == "contrastive" else margin + d[y] - d[j]
            loss += max(0.0, hinge)
            active += hinge > 0
            inactive += hinge <= 0
        losses.append(loss)
    return float(np.mean(losses)), active, inactive


@pytest.mark.parametrize(
    "kind, margin, weight",
    [("contrastive", 1.0, 1.0), ("triplet", 0.8, 1.0), ("triplet", 0.8, 0.5)],
)
def test_normface_agent_loss_matches_formula(kind, margin, weight):
    rng = np.random.default_rng(41)
    w = (rng.normal(size=(C, D)) * rng.uniform(0.5, 2.0, size=(C, 1))).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 1])
    x = rng.normal(size=(N, D))
    # Rows 0-1 next to their own agent, rows 2-3 next to another class's agent, 4-5 random:
    # hinge terms both active and inactive.
    for i, j in enumerate([labels[0], labels[1], (labels[2] + 1) % C, (labels[3] + 2) % C]):
        x[i] = unit(w[j]) + 0.15 * rng.normal(size=D)
    x = (x * rng.uniform(0.5, 3.0, size=(N, 1))).astype(np.float32)
    expected, active, inactive = agent_reference(x, w, labels, kind, margin)
    assert active > 0 and inactive > 0

    # the default agent margin
    head = set_weight(full_head(NormFace(agent_loss=kind, agent_weight=weight), D, C), w)
    x_t, labels_t = torch.from_numpy(x).requires_grad_(), torch.from_numpy(labels)
    head.eval()
    head(x_t, labels_t)
    assert head.extra_loss() is None  # evaluation: no agent loss
    head.train()
    head(x_t, labels_t)
    extra = head.extra_loss()
    assert extra is not None and extra.item() == pytest.approx(weight * expected, rel=1e-5)
    assert head.extra_loss() is None  # consumed by the first call
    extra.backward()  # the agent loss trains both the embeddings and the agents
    assert x_t.grad.abs().sum() > 0 and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("stem, scale", [("cosface", 64.0), ("amsoftmax", 30.0)])
def test_cosface_and_am_softmax_configs(stem, scale):
    x, w, labels = batch(45)
    head = set_weight(build(stem, {}), w)
    assert isinstance(head.rule, CosFace) and head.scale == scale and head.margin == 0.35
    expected = margin_logits(cosines(x, w), labels, scale, lambda i, c: c - 0.35)
    np.testing.assert_allclose(forward(head, x, labels), expected, rtol=0, atol=SCALED_ATOL)


@pytest.mark.parametrize("m1, m2, m3", [(1.0, 0.3, 0.2), (2.0, 0.3, 0.1)])
def test_combined_margin_logits(m1, m2, m3):
    x, w, labels = batch(50)
    head = set_weight(full_head(CombinedMargin(scale=64.0, m1=m1, m2=m2, m3=m3), D, C), w)
    theta = target_angles(x, w, labels)
    limit = (math.pi - m2) / m1
    assert (theta <= limit).any() and (theta > limit).any()
    expected = margin_logits(
        cosines(x, w), labels, 64.0, lambda i, c: combined_target(c, m1, m2, m3)
    )
    np.testing.assert_allclose(forward(head, x, labels), expected, rtol=0, atol=SCALED_ATOL)


def planar(thetas) -> torch.Tensor:
    thetas = np.asarray(thetas, dtype=np.float64)
    return torch.from_numpy(np.stack([np.cos(thetas), np.sin(thetas)], axis=1)).float()


@pytest.mark.parametrize("m1, m2, m3", [(1.0, 0.3, 0.2), (2.0, 0.3, 0.1)])
def test_combined_margin_target_monotonic_and_continuous_over_zero_to_pi(m1, m2, m3):
    scale = 64.0
    margin = CombinedMargin(scale=scale, m1=m1, m2=m2, m3=m3)
    head = set_weight(full_head(margin, 2, 2), [[1, 0], [0, -1]])
    thetas = np.deg2rad(np.arange(0.0, 180.0 + 1e-9, 0.25))
    labels = torch.zeros(len(thetas), dtype=torch.long)
    target = head(planar(thetas), labels)[:, 0].detach().double().numpy()
    assert np.all(np.diff(target) < 0), "the target logit must fall strictly as theta grows"
    limit = (math.pi - m2) / m1
    margined = (thetas <= limit) & (thetas > np.deg2rad(0.1))  # theta ~ 0: cos clamped to 1-1e-7
    expected = scale * (np.cos(m1 * thetas[margined] + m2) - m3)
    np.testing.assert_allclose(target[margined], expected, rtol=0, atol=SCALED_ATOL)
    # Continuous at the limit: the step across 2e-3 rad is the slope there, not a jump.
    delta = 1e-3
    below, above = head(planar([limit - delta, limit + delta]), labels[:2])[:, 0].tolist()
    assert above < below
    assert below - above < scale * (2 * delta * math.sin(limit) + 1e-4)


@pytest.mark.parametrize("target, margin", [("am", 0.35), ("arc", 0.5)])
def test_mvsoftmax_reweights_exactly_the_hard_negatives(target, margin):
    x, w, labels = batch(55)
    t = 1.2
    head = set_weight(full_head(MVSoftmax(scale=32.0, margin=margin, t=t, target=target), D, C), w)
    cos = cosines(x, w)

    def modulated(c):
        return c - margin if target == "am" else float(arc_target(c, margin))

    hard, gaps = [], []

    def non_target(c, t_y):
        hard.append(c > t_y)
        gaps.append(abs(c - t_y))
        return t * c + t - 1.0 if c > t_y else c

    expected = margin_logits(cos, labels, 32.0, lambda i, c: modulated(c), non_target)
    assert any(hard) and not all(hard)
    assert min(gaps) > 1e-4  # no sample sits on the hard/easy boundary
    np.testing.assert_allclose(forward(head, x, labels), expected, rtol=0, atol=5e-4)


def curricular_reference(x, w, labels, t, scale=64.0, margin=0.5):
    """CurricularFace logits with a given t; also whether any non-target is hard / easy."""
    flags = []

    def non_target(c, t_y):
        flags.append(c > t_y)
        return c * (t + c) if c > t_y else c

    logits = margin_logits(
        cosines(x, w), labels, scale, lambda i, c: arc_target(c, margin), non_target
    )
    return logits, any(flags), not all(flags)


def test_curricularface_t_is_an_ema_of_mean_target_cosine_applied_after_the_update():
    # Mostly well-classified rows (large mean cos_y, so t moves visibly) and a few far ones
    # (theta = 3.0 is beyond pi - m: the fallback target), which make hard negatives.
    x1, w, labels1 = batch(60, angles=(0.1, 0.2, 0.3, 0.4, 1.8, 2.9), n_random=0)
    rng = np.random.default_rng(61)
    labels2 = rng.integers(0, C, size=N)
    x2 = np.stack([
        rng.uniform(0.5, 3.0) * direction_at(w[y], angle, rng)
        for y, angle in zip(labels2, (0.15, 0.25, 0.35, 0.5, 2.0, 3.0), strict=True)
    ]).astype(np.float32)
    head = set_weight(full_head(CurricularFace(), D, C), w)
    assert float(head.t) == 0.0
    head.eval()
    forward(head, x1, labels1)
    assert float(head.t) == 0.0  # evaluation does not move t

    head.train()
    logits1 = forward(head, x1, labels1)
    c1 = cosines(x1, w)[np.arange(N), labels1].mean()
    t1 = 0.01 * c1
    assert float(head.t) == pytest.approx(t1, rel=1e-5, abs=1e-8)
    expected1, _, _ = curricular_reference(x1, w, labels1, t1)
    np.testing.assert_allclose(logits1, expected1, rtol=0, atol=SCALED_ATOL)

    logits2 = forward(head, x2, labels2)
    c2 = cosines(x2, w)[np.arange(N), labels2].mean()
    t2 = 0.01 * c2 + 0.99 * (0.01 * c1)
    assert c1 > 0.3 and c2 > 0.3
    assert float(head.t) == pytest.approx(t2, rel=1e-5, abs=1e-8)
    expected2, some_hard, some_easy = curricular_reference(x2, w, labels2, t2)
    assert some_hard and some_easy
    np.testing.assert_allclose(logits2, expected2, rtol=0, atol=SCALED_ATOL)
    # The t before this forward's update would give visibly different hard-negative logits.
    stale, _, _ = curricular_reference(x2, w, labels2, t1)
    assert np.abs(stale - expected2).max() > 50 * SCALED_ATOL

    head.eval()
    t_before = head.t.clone()
    np.testing.assert_allclose(forward(head, x2, labels2), expected2, rtol=0, atol=SCALED_ATOL)
    assert torch.equal(head.t, t_before)


def test_subcenter_arcface_takes_max_over_class_major_subcenters():
    k_count, n = 3, 12
    rng = np.random.default_rng(65)
    w = rng.normal(size=(C * k_count, D)).astype(np.float32)
    labels = rng.integers(0, C, size=n)
    x = rng.normal(size=(n, D))
    for i, angle in enumerate(ANGLES, start=N):  # near one of the K rows of the label's class
        x[i] = 2.0 * direction_at(w[labels[i] * k_count + i % k_count], angle, rng)
    x = x.astype(np.float32)

    head = full_head(SubCenterArcFace(scale=64.0, margin=0.5, subcenters=k_count), D, C)
    assert head.weight.shape == (C * k_count, D)
    set_weight(head, w)
    rows = cosines(x, w)
    cos = np.array(
        [[max(rows[i, j * k_count:(j + 1) * k_count]) for j in range(C)] for i in range(n)]
    )
    expected = margin_logits(cos, labels, 64.0, lambda i, c: arc_target(c, 0.5))
    np.testing.assert_allclose(forward(head, x, labels), expected, rtol=0, atol=SCALED_ATOL)
    # The check pins the layout: a K-major reading of the same matrix gives other cosines, and
    # the winning sub-center is not always the same one.
    k_major = rows.reshape(n, k_count, C).max(axis=1)
    assert np.abs(k_major - cos).max() > 0.05
    assert len({int(np.argmax(rows[i, j * k_count:(j + 1) * k_count]))
                for i in range(n) for j in range(C)}) == k_count


def test_adaface_norm_statistics_ema_and_target():
    # The row at 0.2 rad gets the largest norm: with z = 1 its angle theta - m·z < 0 is clipped
    # to 0, as in the authors' code.
    lengths = [2, 5, 9, 14, 18, 22] + [80, 33, 41, 50, 62, 27]
    x, w, labels = batch(70, lengths=lengths)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    head = set_weight(full_head(AdaFace(), D, C), w)
    assert float(head.norm_mean) == 20.0 and float(head.norm_std) == 100.0

    head.train()
    logits = forward(head, x, labels)
    mean1 = 0.99 * 20.0 + 0.01 * norms.mean()
    std1 = 0.99 * 100.0 + 0.01 * norms.std(ddof=1)  # torch.std is unbiased, as in the paper code
    assert abs(std1 - (0.99 * 100.0 + 0.01 * norms.std(ddof=0))) > 1e-2
    assert float(head.norm_mean) == pytest.approx(mean1, rel=1e-6)
    assert float(head.norm_std) == pytest.approx(std1, rel=1e-6)
    z = adaface_z(norms, mean1, std1)  # the statistics updated by this very forward
    assert (z > 0).any() and (z < 0).any()
    expected = margin_logits(cosines(x, w), labels, 64.0, lambda i, c: adaface_target(c, z[i]))
    np.testing.assert_allclose(logits, expected, rtol=0, atol=SCALED_ATOL)

    # Narrow statistics so that z is clipped at both ends; evaluation leaves them alone.
    with torch.no_grad():
        head.norm_mean.fill_(30.0)
        head.norm_std.fill_(6.0)
    head.eval()
    logits = forward(head, x, labels)
    assert float(head.norm_mean) == 30.0 and float(head.norm_std) == 6.0
    z = adaface_z(norms, 30.0, 6.0)
    assert (z == 1.0).any() and (z == -1.0).any() and (np.abs(z) < 1).any()
    assert target_angles(x, w, labels)[N] < 0.4 * z[N]  # the clipped-angle row
    expected = margin_logits(cosines(x, w), labels, 64.0, lambda i, c: adaface_target(c, z[i]))
    np.testing.assert_allclose(logits, expected, rtol=0, atol=SCALED_ATOL)


def test_magface_margin_grows_with_norm_and_regulariser_matches_formula():
    # Norms below l_a, inside, above u_a; the angle rows reach beyond pi - m(a).
    lengths = [5, 9, 20, 35, 60, 85, 105, 150] + [7, 45, 100, 130, 60, 30]
    x, w, labels = batch(75, n_random=8, lengths=lengths)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    margin = magface_margin(norms)
    np.testing.assert_allclose(margin[[0, 1, 7]], [0.45, 0.45, 0.8])  # clipped at l_a and u_a
    theta = target_angles(x, w, labels)
    beyond = theta > math.pi - margin
    assert beyond.any() and not beyond.all()

    head = set_weight(full_head(MagFace(), D, C), w).train()
    x_t = torch.from_numpy(x).requires_grad_()
    logits = head(x_t, torch.from_numpy(labels)).detach().double().numpy()
    expected = margin_logits(
        cosines(x, w), labels, 64.0, lambda i, c: arc_target(c, margin[i])
    )
    np.testing.assert_allclose(logits, expected, rtol=0, atol=SCALED_ATOL)

    a = np.clip(norms, 10.0, 110.0)
    extra = head.extra_loss()
    assert extra.item() == pytest.approx(35.0 * np.mean(1.0 / a + a / 110.0**2), rel=1e-5)
    assert head.extra_loss() is None
    extra.backward()
    # d/dx of lambda_g/n (1/|x| + |x|/u_a^2) where l_a < |x| < u_a, zero where the norm is clipped.
    inside = (norms > 10.0) & (norms < 110.0)
    factor = 35.0 / len(x) * (-1.0 / norms**2 + 1.0 / 110.0**2) * inside
    np.testing.assert_allclose(x_t.grad.numpy(), factor[:, None] * unit(x), rtol=1e-4, atol=1e-7)
    assert inside.any() and not inside.all()

    head.eval()
    head(x_t, torch.from_numpy(labels))
    assert head.extra_loss() is None


@pytest.mark.parametrize("stem, overrides", [
    ("magface", {}), ("mvsoftmax", {"target": "am", "margin": 0.35}),
    ("mvsoftmax", {"target": "arc", "margin": 0.5}),
])
def test_easy_margin_drops_the_margin_where_cos_y_is_not_positive(stem, overrides):
    """The training codes' ``easy_margin`` (MagFace's, MV-Softmax's SV-X-Softmax): T = the
    margined target where cos_y > 0, cos_y elsewhere; MV-Softmax's hard negatives are still
    those above the margined target. Both the logits and the fused training loss."""
    lengths = [12, 30, 50, 70, 90, 105, 20, 40, 60, 80, 100, 25]
    x, w, labels = batch(77, angles=(0.3, 1.2, 1.7, 2.0, 2.6, 3.0), lengths=lengths)
    cos = cosines(x, w)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    cos_y = cos[np.arange(len(labels)), labels]
    assert (cos_y > 0).any() and (cos_y <= 0).any()
    if stem == "magface":
        scale, t, margin = 64.0, None, magface_margin(norms)
        margined = [float(arc_target(c, margin[i])) for i, c in enumerate(cos_y)]
    else:
        scale, t, m = 32.0, 1.2, overrides["margin"]
        margined = [c - m if overrides["target"] == "am" else float(arc_target(c, m))
                    for c in cos_y]
    expected, between = np.empty_like(cos), []
    for i, y in enumerate(labels):
        for j, c in enumerate(cos[i]):
            if j == y:
                expected[i, j] = margined[i] if cos_y[i] > 0 else cos_y[i]
            elif t is not None and c > margined[i]:  # MV-Softmax: a hard negative
                expected[i, j] = t * c + t - 1.0
                between.append(c <= cos_y[i] <= 0)  # hard by the margined target only
            else:
                expected[i, j] = c
    expected *= scale
    assert stem == "magface" or any(between)  # the case tells the two bounds apart

    margin_head = build(stem, {**overrides, "easy_margin": True}).train()
    set_weight(margin_head, w)
    logits = forward(margin_head, x, labels)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=SCALED_ATOL)
    loss = margin_head.centers(torch.from_numpy(x), torch.from_numpy(labels),
                               margin_head.rule).loss
    expected_loss = F.cross_entropy(torch.from_numpy(expected), torch.from_numpy(labels))
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    paper = forward(set_weight(build(stem, overrides), w), x, labels)
    assert not np.allclose(paper, expected, rtol=0, atol=SCALED_ATOL)  # false: the paper
    assert OmegaConf.load(CONFIG_DIR / f"{stem}.yaml").easy_margin is False


# ---------------------------------------------------------------------------------------------
# 2. psi and 3. the SphereFace annealing schedule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_psi_monotonic_continuous_and_cos_m_theta_on_first_piece(m):
    theta = np.linspace(0.0, math.pi, 20001)
    values = psi(torch.from_numpy(np.cos(theta)), m).numpy()
    assert np.all(np.diff(values) < 0)
    np.testing.assert_allclose(values, psi_ref(theta, m), rtol=0, atol=1e-9)
    first = theta <= math.pi / m
    np.testing.assert_allclose(values[first], np.cos(m * theta[first]), rtol=0, atol=1e-12)
    assert values[-1] == pytest.approx(1 - 2 * m, abs=1e-12)  # psi(pi) = 1 - 2m
    for k in range(1, m):  # both sides of k·pi/m meet at (-1)^k cos(k pi) - 2k = 1 - 2k
        edge = k * math.pi / m
        sides = psi(torch.from_numpy(np.cos([edge - 1e-7, edge + 1e-7])), m).tolist()
        assert sides == pytest.approx([1 - 2 * k, 1 - 2 * k], abs=1e-6)
    # The heads evaluate psi in float32.
    values32 = psi(torch.from_numpy(np.cos(theta)).float(), m).double().numpy()
    np.testing.assert_allclose(values32, psi_ref(theta, m), rtol=0, atol=2e-5)


def test_psi_and_annealed_heads_reject_margins_other_than_1_to_4():
    with pytest.raises(ValueError):
        psi(torch.zeros(3), 5)
    with pytest.raises(ValueError):
        full_head(SphereFace(margin=5), D, C)
    with pytest.raises(ValueError):
        full_head(LSoftmax(margin=0), D, C)


@pytest.mark.parametrize("n", [1, 2, 10, 100, 1000, 1658, 1659, 10000])
def test_sphereface_lambda_at_the_nth_optimizer_step(n):
    x, w, labels = batch(80)
    head = set_weight(full_head(SphereFace(), D, C), w).train()
    for step in range(n) if n <= 10 else [n - 1]:  # or as if resumed after n - 1 steps
        head.set_step(step)
        logits = forward(head, x, labels)
    expected = max(5.0, 1000.0 * (1.0 + 0.12 * n) ** -1)
    assert int(head.iteration) == n
    assert head.state_metrics()["lambda"] == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(
        logits, annealed_reference(x, w, labels, expected, 4, True), **ANNEALED_TOL
    )
    if n <= 10:
        previous = annealed_reference(x, w, labels, sphere_lambda(n - 1), 4, True)
        assert not np.allclose(logits, previous, **ANNEALED_TOL)


# ---------------------------------------------------------------------------------------------
# 4.-7. Every head: gradients at the edges, checkpoints, autocast, statistics and state
# ---------------------------------------------------------------------------------------------

# Margins in the configs (ArcFace-like 0.5, MagFace 0.45..0.8, AdaFace 0.4, CosFace 0.35,
# combined m2 0.3): one embedding just beyond pi - m for each.
BEYOND_MARGINS = (0.5, 0.45, 0.4, 0.35, 0.3, 0.8)


@pytest.mark.parametrize("stem, overrides", HEAD_CASES)
def test_gradients_finite_at_cosine_plus_minus_one_and_beyond_pi_minus_m(stem, overrides):
    torch.manual_seed(0)
    head = build(stem, overrides, embedding_size=4, num_classes=3).train()
    centers = torch.tensor([[1.5, 0, 0, 0], [0, 0.7, 0, 0], [0, 0, 1.2, 0]])
    with torch.no_grad():  # every sub-center of a class on the class direction
        head.weight.copy_(centers.repeat_interleave(getattr(head, "subcenters", 1), dim=0))
    angles = [math.pi - m + 1e-3 for m in BEYOND_MARGINS]
    rows = [[20.0, 0, 0, 0], [0, -30.0, 0, 0]]  # exactly parallel / antiparallel to W_y
    rows += [[0, 0, 40.0 * math.cos(a), 40.0 * math.sin(a)] for a in angles]
    x = torch.tensor(rows, requires_grad=True)
    labels = torch.tensor([0, 1] + [2] * len(angles))
    raw = F.normalize(x.detach(), dim=1) @ F.normalize(centers, dim=1).T
    assert raw[0, 0].item() == 1.0 and raw[1, 1].item() == -1.0

    logits = head(x, labels)
    upstream = torch.randn(logits.shape)  # a gradient on every logit, even where CE saturates
    loss = F.cross_entropy(logits, labels) + (logits * upstream).sum()
    extra = head.extra_loss()
    assert (extra is not None) == (case_id(stem, overrides) in HAS_EXTRA_LOSS)
    if extra is not None:
        loss = loss + extra
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert torch.isfinite(x.grad).all() and (x.grad.abs().sum(dim=1) > 0).all()
    for name, parameter in head.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


STATEFUL = {
    "curricular": (lambda: full_head(CurricularFace(), D, C), {"t"}),
    "sphereface": (lambda: full_head(SphereFace(), D, C), {"iteration"}),
    "lsoftmax": (lambda: full_head(LSoftmax(), D, C), {"iteration"}),
    "adaface": (lambda: full_head(AdaFace(), D, C), {"norm_mean", "norm_std"}),
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_head_state_survives_checkpoint_round_trip(name, tmp_path):
    make, state_names = STATEFUL[name]
    torch.manual_seed(3)
    head = make().train()
    with torch.no_grad():
        head.weight.normal_()
    initial = {k: v.clone() for k, v in head.named_buffers()}
    assert {k.rsplit(".", 1)[-1] for k in initial} == state_names
    batches = [batch(90 + i, lengths=np.linspace(3, 60, 12)) for i in range(4)]
    for step, (x, _, labels) in enumerate(batches[:3]):
        head.set_step(step)  # as the module does before each training batch
        head(torch.from_numpy(x), torch.from_numpy(labels))
    assert all(not torch.equal(initial[k], v) for k, v in head.named_buffers())  # state moved

    torch.save(head.state_dict(), tmp_path / "head.pt")
    fresh = make()
    fresh.load_state_dict(torch.load(tmp_path / "head.pt", weights_only=True))
    restored = dict(fresh.named_buffers())
    for key, value in head.named_buffers():
        assert restored[key].dtype == value.dtype and torch.equal(restored[key], value), key

    x, _, labels = batches[3]
    for training in (False, True):  # evaluation, then the next training step after resuming
        head.train(training)
        fresh.train(training)
        np.testing.assert_array_equal(forward(head, x, labels), forward(fresh, x, labels))
    for key, value in head.named_buffers():
        assert torch.equal(restored[key], value), key


@pytest.mark.parametrize("stem, overrides", HEAD_CASES)
def test_float32_logits_under_bfloat16_autocast(stem, overrides):
    torch.manual_seed(4)
    head = build(stem, overrides).train()
    with torch.no_grad():
        head.weight.normal_()
    reference_head = copy.deepcopy(head)
    x = (torch.randn(N, D) * torch.linspace(2.0, 40.0, N)[:, None]).bfloat16()
    labels = torch.randint(0, C, (N,))

    expected = reference_head(x.float(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x, labels)
        extra = head.extra_loss()
    assert logits.dtype == torch.float32
    # float32 math inside: bf16 cosines at s = 64 would be off by ~0.1 or more.
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
    expected_extra = reference_head.extra_loss()
    assert (extra is None) == (expected_extra is None)
    if extra is not None:
        assert extra.dtype == torch.float32
        torch.testing.assert_close(extra, expected_extra, rtol=1e-5, atol=1e-5)
    for (key, value), (_, ref) in zip(
        head.named_buffers(), reference_head.named_buffers(), strict=True
    ):
        torch.testing.assert_close(value, ref, rtol=1e-6, atol=0, msg=key)


def unmargined_ref(head, x, w) -> np.ndarray:
    """The logits without a margin, whose argmax is the top-1 prediction."""
    name = type(head.rule).__name__
    bias = getattr(head, "bias", None)
    bias = 0.0 if bias is None else bias.detach().double().numpy()
    if name == "Softmax":
        return x.astype(np.float64) @ w.astype(np.float64).T + bias
    if name == "L2Softmax":
        return head.alpha.item() * unit(x) @ w.astype(np.float64).T + bias
    if name == "LSoftmax":
        return x.astype(np.float64) @ w.astype(np.float64).T
    return class_cosines(head, x, w)


STATISTICS_KEYS = {
    "accuracy", "theta_y", "theta_max_negative", "cos_max_negative", "hard_negative_fraction"
}


@pytest.mark.parametrize("stem, overrides", HEAD_CASES)
def test_statistics_for_every_head(stem, overrides):
    rng = np.random.default_rng(100)
    head = build(stem, overrides).train()
    w = rng.normal(size=tuple(head.weight.shape)).astype(np.float32)
    set_weight(head, w)
    if getattr(head, "bias", None) is not None:
        with torch.no_grad():
            head.bias.copy_(torch.from_numpy(rng.normal(size=C).astype(np.float32)))
    n, k_count = 10, getattr(head, "subcenters", 1)
    labels = rng.integers(0, C, size=n)
    x = rng.normal(size=(n, D)) * np.linspace(2.0, 40.0, n)[:, None]
    x[0] = 3.0 * w[labels[0] * k_count]  # parallel to (a sub-center of) its class
    x[1] = -2.0 * w[labels[1] * k_count]
    x = x.astype(np.float32)
    state = {k: v.clone() for k, v in head.state_dict().items()}

    stats = head.statistics(torch.from_numpy(x), torch.from_numpy(labels))
    assert set(stats) == STATISTICS_KEYS
    assert stats["theta_y"].shape == stats["theta_max_negative"].shape == (n,)
    for key in ("theta_y", "theta_max_negative"):
        assert ((stats[key] >= 0) & (stats[key] <= 180)).all(), key

    cos = class_cosines(head, x, w)
    rows = np.arange(n)
    cos_y = cos[rows, labels]
    negative = cos.copy()
    negative[rows, labels] = -np.inf
    cos_negative = negative.max(axis=1)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    # float64 rounding can put an exactly (anti-)parallel pair a hair outside [-1, 1]
    theta_y = np.degrees(np.arccos(np.clip(cos_y, -1.0, 1.0)))
    np.testing.assert_allclose(stats["theta_y"].numpy(), theta_y, atol=0.05)
    np.testing.assert_allclose(
        stats["theta_max_negative"].numpy(), np.degrees(np.arccos(cos_negative)), atol=1e-3
    )
    assert stats["cos_max_negative"].item() == pytest.approx(cos_negative.mean(), abs=1e-6)
    accuracy = np.mean(unmargined_ref(head, x, w).argmax(axis=1) == labels)
    assert stats["accuracy"].item() == pytest.approx(accuracy)
    hard = np.mean(cos_negative > target_ref(head, cos_y, norms))
    assert stats["hard_negative_fraction"].item() == pytest.approx(hard)
    # Logging must not advance the head's state (iteration, t, norm statistics).
    for key, value in head.state_dict().items():
        assert torch.equal(value, state[key]), key


STATE_KEYS = {
    "sphereface": {"lambda"}, "lsoftmax": {"lambda"}, "curricular": {"t"},
    "adaface": {"norm_mean", "norm_std"}, "normface": {"scale"}, "l2softmax": {"alpha"},
}


@pytest.mark.parametrize("stem, overrides", HEAD_CASES)
def test_state_metrics_report_the_head_state(stem, overrides):
    torch.manual_seed(5)
    head = build(stem, overrides).train()
    learnt = [p for name, p in head.named_parameters()
              if name.rsplit(".", 1)[-1] in ("scale", "alpha")]
    optimizer = torch.optim.SGD([p for p in learnt if p.requires_grad] or [head.weight], lr=1.0)
    x, _, labels = batch(110, lengths=np.linspace(3, 60, 12))
    for step in range(2):
        head.set_step(step)
        logits = head(torch.from_numpy(x), torch.from_numpy(labels))
        F.cross_entropy(logits, torch.from_numpy(labels)).backward()
        optimizer.step()
        optimizer.zero_grad()
    metrics = head.state_metrics()
    assert set(metrics) == STATE_KEYS.get(stem, set())
    # detached 0-d tensors: logging them every step costs no device-to-host copy
    assert all(isinstance(value, torch.Tensor) and value.ndim == 0 and not value.requires_grad
               for value in metrics.values())
    if "lambda" in metrics:
        assert metrics["lambda"] == pytest.approx(1000.0 / (1 + 0.12 * 2), rel=1e-12)
    if "t" in metrics:
        assert metrics["t"] == float(head.t) and metrics["t"] != 0.0
    if "norm_mean" in metrics:
        norms = np.linalg.norm(x.astype(np.float64), axis=1)
        mean, std = 20.0, 100.0
        for _ in range(2):
            mean = 0.99 * mean + 0.01 * norms.mean()
            std = 0.99 * std + 0.01 * norms.std(ddof=1)
        assert metrics["norm_mean"] == pytest.approx(mean, rel=1e-6)
        assert metrics["norm_std"] == pytest.approx(std, rel=1e-6)
    for name in ("scale", "alpha"):
        if name in metrics:
            parameter = getattr(head, name)
            assert metrics[name] == float(parameter)
            # Fixed: the config value; learnt: it moved with the optimizer step.
            assert (metrics[name] != {"scale": 30.0, "alpha": 32.0}[name]) == (
                parameter.requires_grad
            )
