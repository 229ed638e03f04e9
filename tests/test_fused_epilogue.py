"""The fused margin epilogue (facetrain/classifiers/fused.py), which computes the training loss of
every cosine margin, against an independent float64 computation of the same loss: autograd
through the reference form (cosines by a matrix product, ``Margin.logits``, whose formulas
test_head_family.py checks against the papers, and ``F.cross_entropy``), in float64. Loss and
every gradient (embeddings, class centers, a learnt or per-row scale) must agree, on both stores,
at the edges too: cos_y = ±1, beyond pi − m, zero-norm centers, tied sub-centers. Partial-FC over
two ranks runs the fused path in test_partial_fc.py (against the full store)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import margin_configs
from hydra.utils import instantiate
from omegaconf import OmegaConf

from facetrain.classifiers import FullClassCenters, PartialFC
from facetrain.heads import ArcFace, CenterCosines, CurricularFace, MVSoftmax, SubCenterArcFace
from facetrain.heads.base import clamp_cosine, no_reduce
from facetrain.losses.focal import focal_loss

N, D, C = 12, 8, 7
CONFIGS = {path.stem: path for path in margin_configs()}
# Not fused: plain products (softmax family), a scale by class (L-Softmax), agent losses on the
# (N, C) cosines (NormFace's); every other margin head of configs/loss/ is.
REFERENCE_ONLY = {"softmax", "l2softmax", "lsoftmax", "normface_contrastive", "normface_triplet"}
VARIANTS = {
    "mvsoftmax-arc": ("mvsoftmax", {"target": "arc", "margin": 0.5}),
    "mvsoftmax-easy": ("mvsoftmax", {"easy_margin": True}),
    "magface-easy": ("magface", {"easy_margin": True}),
    "arcface-easy": ("arcface", {"easy_margin": True}),
    "normface-learnt": ("normface", {"learn_scale": True}),
    "sphereface-unannealed": ("sphereface", {"base": 0.0, "lambda_min": 0.0}),
    # a small scale: the row parallel to its center is not confident, so the clamp at
    # cos_y = 1 − 1e-7 must stop the target's steep gradient there, as in the reference
    "arcface-s4": ("arcface", {"scale": 4.0}),
}
CASES = {stem: (stem, {}) for stem in CONFIGS if stem not in REFERENCE_ONLY} | VARIANTS
TOLERANCE = {"rtol": 2e-5, "atol": 2e-5}


def make_margin(case: str):
    stem, overrides = CASES[case]
    return instantiate(OmegaConf.load(CONFIGS[stem]), **overrides)


def edge_batch(weight: torch.Tensor, k: int = 1, seed: int = 0):
    """Gaussian rows of norms 1 to 40, then rows exactly parallel and antiparallel to their
    center, and rows at 0.3, 1.5, 2.2 rad and just beyond pi − 0.5 and pi − 0.35."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=generator)
    x = torch.randn(N, D, generator=generator) * torch.linspace(1.0, 40.0, N)[:, None]
    x[0] = 3.0 * weight[labels[0] * k]
    x[1] = -2.0 * weight[labels[1] * k]
    for row, angle in enumerate((0.3, 1.5, 2.2, math.pi - 0.5 + 1e-3, math.pi - 0.35 + 1e-3), 2):
        u = F.normalize(weight[labels[row] * k], dim=0)
        v = torch.randn(D, generator=generator)
        v = F.normalize(v - (v @ u) * u, dim=0)
        x[row] = 12.0 * (math.cos(angle) * u + math.sin(angle) * v)  # not at MagFace's l_a=10
    return x, labels


def reference(margin, x, weight, labels, k: int = 1, focal_gamma: float = 0.0):
    """Loss and gradients in float64 by autograd through the reference form."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    norms = x64.norm(dim=1, keepdim=True)
    center_norms = w64.norm(dim=1).clamp_min(1e-12)
    cos = F.normalize(x64, dim=1) @ w64.T / center_norms
    if k > 1:
        cos = cos.view(len(x), -1, k).amax(dim=2)
        center_norms = center_norms.view(-1, k).amax(dim=1)
    index = labels.view(-1, 1)
    c = CenterCosines(cos, clamp_cosine(cos.gather(1, index)), index, norms, center_norms,
                      norms)
    if margin.training:
        margin.advance(c, no_reduce)
    rows = F.cross_entropy(margin.logits(c), labels, reduction="none")
    loss = focal_loss(rows, focal_gamma)
    extra = margin.extra_loss()
    if extra is not None:
        loss = loss + extra
    loss.backward()
    return loss.detach(), x64.grad, w64.grad, parameter_grads(margin)


def parameter_grads(margin) -> dict:
    return {name: p.grad.clone() for name, p in margin.named_parameters() if p.requires_grad}


def fused(store, margin, x, labels):
    x = x.detach().clone().requires_grad_(True)
    loss = store(x, labels, margin).loss
    extra = margin.extra_loss()
    if extra is not None:
        loss = loss + extra
    loss.backward()
    return loss.detach(), x.grad, store.weight.grad, parameter_grads(margin)


def assert_agree(got, expected, tolerance=TOLERANCE):
    (loss, x_grad, w_grad, p_grads), (ref_loss, ref_x, ref_w, ref_p) = got, expected
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    # gradients relative to their largest entry: float32 against float64
    for name, grad, ref in [("x", x_grad, ref_x), ("W", w_grad, ref_w),
                            *[(n, p_grads[n], ref_p[n]) for n in ref_p]]:
        scale = ref.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(grad.double() / scale, ref.double() / scale, **tolerance,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert p_grads.keys() == ref_p.keys()


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_loss_and_gradients_equal_the_float64_reference(case):
    torch.manual_seed(1)
    margin = make_margin(case).train()
    assert margin.fused_epilogue
    store = FullClassCenters(D, C, margin).train()
    k = margin.centers_per_class
    with torch.no_grad():
        store.weight.normal_()
    x, labels = edge_batch(store.weight.detach(), k)
    expected = reference(copy.deepcopy(margin), x, store.weight, labels, k)
    assert_agree(fused(store, margin, x, labels), expected)
    if case in ("curricular", "adaface"):  # the state advanced as the reference's did
        assert any(not torch.equal(b, b0) for b, b0 in
                   zip(margin.buffers(), make_margin(case).buffers(), strict=True))


def test_reference_only_margins_are_the_ones_the_fused_node_cannot_run():
    fused_heads = {stem for stem, path in CONFIGS.items()
                   if instantiate(OmegaConf.load(path)).fused_epilogue}
    assert fused_heads == set(CONFIGS) - REFERENCE_ONLY

    class HalfNegatives(ArcFace):  # a margin with its own N: runs its own formula
        def non_target_logit(self, cos, target):
            return 0.5 * cos

    margin = HalfNegatives(scale=16.0).train()
    assert not margin.fused_epilogue
    store = FullClassCenters(D, C, margin).train()
    x, labels = edge_batch(store.weight.detach())
    loss = store(x, labels, margin).loss
    cos = F.normalize(x.double(), dim=1) @ F.normalize(store.weight.detach().double(), dim=1).T
    logits = 0.5 * cos
    rows = torch.arange(N)
    cos_y = clamp_cosine(cos[rows, labels])
    logits[rows, labels] = torch.where(
        torch.acos(cos_y) > math.pi - 0.5, cos_y - 0.5 * math.sin(0.5), torch.cos(
            torch.acos(cos_y) + 0.5))
    torch.testing.assert_close(loss.double(), F.cross_entropy(16.0 * logits, labels))


@pytest.mark.parametrize("case", ["arcface", "curricular", "magface"])
def test_focal_weights_reach_every_row(case):
    """A per-row upstream gradient (the focal weight), not just the mean's 1/N."""
    torch.manual_seed(2)
    margin = make_margin(case).train()
    store = FullClassCenters(D, C, margin, focal_gamma=2.0).train()
    with torch.no_grad():
        store.weight.normal_()
    x, labels = edge_batch(store.weight.detach(), seed=2)
    expected = reference(copy.deepcopy(margin), x, store.weight, labels, focal_gamma=2.0)
    assert_agree(fused(store, margin, x, labels), expected)


def test_zero_norm_centers_and_embeddings_keep_finite_matching_gradients():
    """A zero center (its norm clamped: cosine 0, no gradient through the norm) that is one
    row's target and another's negative, and a zero embedding."""
    torch.manual_seed(3)
    margin = CurricularFace(scale=16.0).train()
    store = FullClassCenters(D, C, margin).train()
    with torch.no_grad():
        store.weight.normal_()
        store.weight[2] = 0.0
    x, labels = edge_batch(store.weight.detach(), seed=3)
    labels[5] = 2
    x[6] = 0.0
    expected = reference(copy.deepcopy(margin), x, store.weight, labels)
    loss, x_grad, w_grad, _ = got = fused(store, margin, x, labels)
    assert torch.isfinite(loss) and torch.isfinite(x_grad).all() and torch.isfinite(w_grad).all()
    assert w_grad[2].abs().max() > 1e6  # 1/|W_j| at the floor: large, finite, as in the reference
    # row by row: the zero center's gradient is 1e12 times the others'
    for j in range(C):
        scale = expected[2][j].abs().max()
        torch.testing.assert_close(w_grad[j].double() / scale, expected[2][j] / scale,
                                   **TOLERANCE)
    assert_agree((got[0], got[1], torch.zeros(1), {}), (expected[0], expected[1],
                                                         torch.zeros(1).double(), {}))


def test_tied_sub_centers_share_the_gradient_as_amax_does():
    torch.manual_seed(4)
    margin = SubCenterArcFace(scale=16.0).train()
    store = FullClassCenters(D, C, margin).train()
    with torch.no_grad():
        store.weight.normal_()
        store.weight[1] = store.weight[0]  # class 0: two identical sub-centers
        store.weight[3 * 4 + 2] = store.weight[3 * 4]
    x, labels = edge_batch(store.weight.detach(), k=3, seed=4)
    labels[:3] = 0
    expected = reference(copy.deepcopy(margin), x, store.weight, labels, k=3)
    got = fused(store, margin, x, labels)
    assert_agree(got, expected)
    torch.testing.assert_close(got[2][0], got[2][1])  # split evenly between the tied two


def test_partial_fc_sampled_centers_on_one_process():
    """sample_rate 0.5: the loss over the sampled centers only, their gradient, zero elsewhere."""
    torch.manual_seed(5)
    margin = CurricularFace(scale=16.0).train()
    store = PartialFC(D, 20, margin, sample_rate=0.5).train()
    with torch.no_grad():
        store.weight.normal_()
    drawn, sample = [], store._sample
    store._sample = lambda *args: drawn.append(sample(*args)) or drawn[-1]
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, D, generator=generator) * 5.0
    labels = torch.tensor([0, 3, 3, 17, 11, 19])
    reference_margin = copy.deepcopy(margin)
    got = fused(store, margin, x, labels)
    sampled = drawn[0]
    assert set(labels.tolist()) <= set(sampled.tolist()) and len(sampled) == 10
    columns = torch.searchsorted(sampled, labels)
    loss, x_grad, w_grad, _ = reference(reference_margin, x, store.weight.detach()[sampled],
                                        columns)
    full_grad = torch.zeros(20, D, dtype=torch.float64)
    full_grad[sampled] = w_grad
    assert_agree(got, (loss, x_grad, full_grad, {}))


def test_no_grad_and_eval_give_the_training_loss_without_a_graph():
    torch.manual_seed(6)
    margin = MVSoftmax().eval()
    store = FullClassCenters(D, C, margin).eval()
    x, labels = edge_batch(store.weight.detach(), seed=6)
    with torch.no_grad():
        loss = store(x, labels, margin).loss
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), reference(margin, x, store.weight, labels)[0])


@pytest.mark.parametrize("case", ["arcface", "mvsoftmax", "subcenter"])
def test_statistics_of_the_fused_forward_equal_those_of_the_cosines(case):
    torch.manual_seed(7)
    margin = make_margin(case).train()
    store = FullClassCenters(D, C, margin).train()
    x, labels = edge_batch(store.weight.detach(), margin.centers_per_class, seed=7)
    output = store(x, labels, margin, statistics=True)
    expected = store.statistics(x, labels, margin)
    assert output.statistics.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(output.statistics[key], value, rtol=1e-5, atol=1e-4,
                                   msg=lambda m, key=key: f"{key}: {m}")


def test_float32_loss_under_bfloat16_autocast():
    torch.manual_seed(8)
    margin = CurricularFace().train()
    store = FullClassCenters(D, C, margin).train()
    x = (torch.randn(N, D) * 10).bfloat16()
    labels = torch.randint(0, C, (N,))
    expected = reference(copy.deepcopy(margin), x.float(), store.weight, labels)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = store(x, labels, margin).loss
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)


def test_a_second_backward_through_the_node_is_refused():
    margin = ArcFace().train()
    store = FullClassCenters(D, C, margin).train()
    x, labels = edge_batch(store.weight.detach())
    loss = store(x, labels, margin).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()
