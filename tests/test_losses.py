"""The metric losses and the focal weighting against direct computations: explicit loops over the
pairs and triplets of hand-made embeddings, in float64, never the vectorised code under test."""

import math
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

from facetrain.classifiers import FullClassCenters
from facetrain.heads import ArcFace, Softmax
from facetrain.losses import CenterLoss, ContrastiveLoss, LossError, TripletLoss, focal_loss

LABELS = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4])  # a class of three, one singleton


def embeddings(seed: int = 0, rows: int = len(LABELS), dim: int = 5) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


def unit_distance(x: torch.Tensor, i: int, j: int) -> float:
    a, b = x[i].double() / x[i].double().norm(), x[j].double() / x[j].double().norm()
    return float((a - b).norm())


# -- contrastive --------------------------------------------------------------------------------

def contrastive_by_loops(x: torch.Tensor, labels: torch.Tensor, margin: float) -> float:
    positives, negatives = [], []
    for i, j in combinations(range(len(labels)), 2):
        d = unit_distance(x, i, j)
        if labels[i] == labels[j]:
            positives.append(0.5 * d * d)
        else:
            negatives.append(0.5 * max(0.0, margin - d) ** 2)
    mean = lambda values: sum(values) / len(values) if values else 0.0  # noqa: E731
    return mean(positives) + mean(negatives)


@pytest.mark.parametrize("margin", [0.5, 1.0, 1.6])
def test_contrastive_equals_the_pairwise_formula(margin):
    x = embeddings()
    output = ContrastiveLoss(margin)(x, LABELS)
    assert float(output.loss) == pytest.approx(contrastive_by_loops(x, LABELS, margin), rel=1e-5)
    same = sum(int(LABELS[i] == LABELS[j]) for i, j in combinations(range(len(LABELS)), 2))
    assert float(output.metrics["positive_pairs"]) == same == 5


# -- triplet ------------------------------------------------------------------------------------

def semihard_by_loops(x, labels, margin) -> tuple[float, int, int]:
    """FaceNet semi-hard mining as the TripletLoss docstring states it, one (a, p) at a time:
    the closest negative farther than the positive, else the farthest negative."""
    losses = []
    for a in range(len(labels)):
        negatives = [n for n in range(len(labels)) if labels[n] != labels[a]]
        for p in range(len(labels)):
            if p == a or labels[p] != labels[a] or not negatives:
                continue
            d_ap = unit_distance(x, a, p) ** 2
            d_an = [unit_distance(x, a, n) ** 2 for n in negatives]
            farther = [d for d in d_an if d > d_ap]
            chosen = min(farther) if farther else max(d_an)
            losses.append(max(0.0, d_ap - chosen + margin))
    return sum(losses) / len(losses), len(losses), sum(loss > 0 for loss in losses)


def batch_hard_by_loops(x, labels, margin) -> tuple[float, int]:
    losses = []
    for a in range(len(labels)):
        positives = [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        negatives = [n for n in range(len(labels)) if labels[n] != labels[a]]
        if positives and negatives:
            hardest_positive = max(unit_distance(x, a, p) ** 2 for p in positives)
            hardest_negative = min(unit_distance(x, a, n) ** 2 for n in negatives)
            losses.append(max(0.0, hardest_positive - hardest_negative + margin))
    return sum(losses) / len(losses), len(losses)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_semihard_triplet_equals_the_loops(seed, margin):
    x = embeddings(seed)
    expected, triplets, active = semihard_by_loops(x, LABELS, margin)
    output = TripletLoss(margin, "semihard")(x, LABELS)
    assert float(output.loss) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert float(output.metrics["triplets"]) == triplets == 2 + 6 + 2
    assert float(output.metrics["active_fraction"]) == pytest.approx(active / triplets)


@pytest.mark.parametrize("seed", [0, 3])
def test_batch_hard_triplet_equals_the_loops(seed):
    x = embeddings(seed)
    expected, anchors = batch_hard_by_loops(x, LABELS, 0.2)
    output = TripletLoss(0.2, "batch_hard")(x, LABELS)
    assert float(output.loss) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert float(output.metrics["triplets"]) == anchors == 7  # the two singletons have no positive


def on_circle(degrees: list[float]) -> torch.Tensor:
    """Unit vectors at the given angles: squared distances are 2 - 2 cos(angle difference)."""
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1).float()


def squared(degrees: float) -> float:
    return 2 - 2 * math.cos(math.radians(degrees))


def test_semihard_picks_the_closest_negative_farther_than_the_positive():
    # anchor 0 at 0 deg, its positive at 20 deg; negatives at 10 (hard), 25 and 30 (semi-hard
    # for alpha = squared(40) - squared(20)), 90 (easy).
    x = on_circle([0, 20, 10, 25, 30, 90])
    labels = torch.tensor([0, 0, 1, 2, 3, 4])
    alpha = squared(40) - squared(20)
    loss = TripletLoss(alpha)
    distances = torch.tensor([squared(a) for a in (0, 20, 10, 25, 30, 90)])
    # the anchor-0 / positive-1 triplet uses the negative at 25 deg, not the harder one at 10
    # and not the one at 30: its loss is squared(20) - squared(25) + alpha
    expected_01 = squared(20) - squared(25) + alpha
    # the reverse pair (anchor 1 at 20, positive 0): d_ap = squared(20); negatives from 20 deg
    # at 10, 5, 10, 70 deg: the closest farther than 20 deg is 70 deg (beyond the window): easy
    output = loss(x, labels)
    assert distances[3] > distances[1]
    assert float(output.loss) == pytest.approx(expected_01 / 2, rel=1e-4)
    assert float(output.metrics["active_fraction"]) == 0.5


def test_semihard_falls_back_to_the_farthest_hard_negative():
    # every negative is closer to the anchor than its positive (60 deg): none is semi-hard; the
    # fallback is the least hard one (50 deg), never the hardest (10 deg)
    x = on_circle([0, 60, 10, 30, 50])
    labels = torch.tensor([0, 0, 1, 2, 3])
    output = TripletLoss(0.2)(x[:5], labels)
    anchor_0 = squared(60) - squared(50) + 0.2
    # anchor 1 (60 deg) to negatives at 50, 30, 10 deg: closest farther than 60 deg: none
    # either (50, 30, 10 deg away from 60: distances 10, 30, 50 deg) -> farthest, 50 deg away
    anchor_1 = squared(60) - squared(50) + 0.2
    assert float(output.loss) == pytest.approx((anchor_0 + anchor_1) / 2, rel=1e-4)
    assert float(output.metrics["active_fraction"]) == 1.0


# -- batches with nothing to learn from --------------------------------------------------------

@pytest.mark.parametrize(
    "loss", [ContrastiveLoss(), TripletLoss(), TripletLoss(mining="batch_hard")],
    ids=["contrastive", "semihard", "batch_hard"])
@pytest.mark.parametrize("labels", [torch.arange(6), torch.zeros(6, dtype=torch.long)],
                         ids=["no-positive", "no-negative"])
def test_a_batch_without_pairs_gives_zero_and_a_finite_gradient(loss, labels):
    x = embeddings(rows=6).requires_grad_()
    output = loss(x, labels)
    output.loss.backward()
    assert torch.isfinite(x.grad).all()
    if isinstance(loss, TripletLoss):  # no anchor has both a positive and a negative
        assert float(output.loss) == 0.0 and float(output.metrics["triplets"]) == 0.0
    else:  # the half without pairs is 0, the other half still counts
        expected = contrastive_by_loops(x.detach(), labels, loss.margin)
        assert float(output.loss) == pytest.approx(expected, rel=1e-5)
        positives = 15.0 if labels.unique().numel() == 1 else 0.0
        assert float(output.metrics["positive_pairs"]) == positives


def test_identical_embeddings_keep_a_finite_gradient():
    # a collapsed model: every distance is 0, where sqrt has an infinite derivative
    x = torch.ones(6, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    for loss in (ContrastiveLoss(), TripletLoss(), TripletLoss(mining="batch_hard")):
        x.grad = None
        output = loss(x, labels)
        output.loss.backward()
        assert torch.isfinite(output.loss) and torch.isfinite(x.grad).all()


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(LossError, match="mining must be one of semihard, batch_hard"):
        TripletLoss(mining="hardest")
    with pytest.raises(LossError, match="margin must be positive"):
        TripletLoss(margin=0)
    with pytest.raises(LossError, match=r"contrastive margin must be in \(0, 2\]"):
        ContrastiveLoss(margin=3)
    with pytest.raises(LossError, match=r"alpha must be in \(0, 1\]"):
        CenterLoss(alpha=0)


# -- center loss --------------------------------------------------------------------------------

def center_step_by_formula(centers: list[list[float]], x: torch.Tensor, labels, alpha):
    """Wen et al. 2016, Algorithm 1, class by class: c_j -= alpha * sum_{y_i=j}(c_j - x_i) /
    (1 + n_j)."""
    updated = [list(row) for row in centers]
    for j in set(labels.tolist()):
        rows = [i for i, y in enumerate(labels.tolist()) if y == j]
        for d in range(len(centers[j])):
            delta = sum(centers[j][d] - float(x[i, d]) for i in rows) / (1 + len(rows))
            updated[j][d] = centers[j][d] - alpha * delta
    return updated


def test_center_loss_and_update_follow_the_paper_over_two_steps():
    loss = CenterLoss(alpha=0.5)
    loss.bind(num_classes=5, embedding_size=3)
    expected = [[0.0] * 3 for _ in range(5)]
    batches = [(embeddings(1, 6, 3), torch.tensor([0, 2, 2, 4, 2, 1])),  # class 2 three times
               (embeddings(2, 5, 3), torch.tensor([2, 0, 0, 3, 1]))]  # class 0 twice
    for x, labels in batches:
        value = sum(sum((float(x[i, d]) - expected[y][d]) ** 2 for d in range(3))
                    for i, y in enumerate(labels.tolist())) / (2 * len(labels))
        output = loss(x, labels)  # computed with the centers before this step
        assert float(output.loss) == pytest.approx(value, rel=1e-5)
        expected = center_step_by_formula(expected, x, labels, 0.5)
        assert torch.allclose(loss.centers, torch.tensor(expected), atol=1e-6)
    assert loss.centers[3].abs().sum() > 0 and loss.centers[4].abs().sum() > 0


def test_a_skipped_step_puts_the_centers_back():
    """The module's non-finite skip restores every buffer the forward moved: the centers too."""
    from facetrain.module import FaceRecognitionModule

    backbone = torch.nn.Linear(6, 3)
    backbone.embedding_size = 3
    center = CenterLoss()
    center.bind(4, 3)
    model = FaceRecognitionModule(backbone, None, None, torch.optim.SGD,
                                  losses={"center": (0.003, center)})
    model._snapshot_buffers()  # as before every step's first forward
    before = center.centers.clone()
    model.losses["center"](embeddings(0, 4, 3), torch.tensor([0, 1, 1, 3]))
    assert not torch.equal(center.centers, before)
    model._restore_buffers()  # as a skipped step does
    assert torch.equal(center.centers, before)


def test_center_loss_gradient_goes_to_the_embeddings_only():
    loss = CenterLoss()
    loss.bind(3, 4)
    x = embeddings(0, 4, 4).requires_grad_()
    labels = torch.tensor([0, 1, 1, 2])
    loss(x, labels).loss.backward()
    # d/dx of 1/2 mean |x - c|^2 with c = 0 before the update: x / N
    assert torch.allclose(x.grad, x.detach() / 4, atol=1e-6)
    assert not any(True for _ in loss.parameters())  # the centers are no optimizer's business
    evaluated = CenterLoss()
    evaluated.bind(3, 4)
    evaluated.eval()(x, labels)  # no update outside training
    assert evaluated.centers.abs().sum() == 0


# -- focal --------------------------------------------------------------------------------------

def test_focal_with_gamma_zero_is_cross_entropy_exactly():
    x, labels = embeddings(0, 9, 6), LABELS
    torch.manual_seed(0)
    plain = FullClassCenters(6, 5, Softmax())
    focal = FullClassCenters(6, 5, Softmax(), focal_gamma=0.0)
    focal.load_state_dict(plain.state_dict())
    logits = F.linear(x, plain.weight, plain.bias)
    # the same value as PyTorch's cross-entropy (to the rounding of its own mean reduction)
    torch.testing.assert_close(focal(x, labels, Softmax()).loss, F.cross_entropy(logits, labels),
                               rtol=1e-6, atol=0)
    rows = F.cross_entropy(logits, labels, reduction="none")
    assert torch.equal(focal_loss(rows, 0.0), rows.mean())  # no weighting at all


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_equals_the_formula_on_a_margin_head(gamma):
    x, labels = embeddings(0, 9, 6), LABELS
    torch.manual_seed(0)
    centers = FullClassCenters(6, 5, ArcFace(scale=16, margin=0.3), focal_gamma=gamma)
    margin = ArcFace(scale=16, margin=0.3)
    loss = centers(x, labels, margin).loss
    # ArcFace logits by hand, then -(1 - p)^gamma log p row by row
    cos = F.normalize(x.double(), dim=1) @ F.normalize(centers.weight.double(), dim=1).T
    total = 0.0
    for i, y in enumerate(labels.tolist()):
        row = [16 * float(c) for c in cos[i]]
        theta = math.acos(float(cos[i, y]))
        row[y] = 16 * math.cos(theta + 0.3)
        p = math.exp(row[y]) / sum(math.exp(v) for v in row)
        total += -((1 - p) ** gamma) * math.log(p)
    assert float(loss) == pytest.approx(total / len(labels), rel=1e-5)


def test_focal_gradient_is_finite_for_confident_rows():
    confident = torch.tensor([0.0, 1e-9, 30.0], requires_grad=True)  # CE of p = 1, ~1, ~0
    focal_loss(confident, 0.5).backward()
    assert torch.isfinite(confident.grad).all()
    with pytest.raises(LossError, match="focal_gamma must be >= 0"):
        FullClassCenters(6, 5, Softmax(), focal_gamma=-1)


def center_batch(rank: int):
    """Each rank's batch (the same size on every rank, as the training samplers give), sharing
    classes across the ranks."""
    return embeddings(10 + rank, 4, 3), torch.tensor([[0, 2, 2, 1], [2, 3, 0, 2]][rank])


def center_step_on_rank(rank: int, world_size: int, init_file: str, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        loss = CenterLoss(alpha=0.5)
        loss.bind(num_classes=4, embedding_size=3)
        loss(*center_batch(rank))
        results[rank] = loss.centers.tolist()
    finally:
        torch.distributed.destroy_process_group()


def test_under_ddp_every_rank_takes_the_center_step_of_the_global_batch(tmp_path):
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(center_step_on_rank, args=(2, str(tmp_path / "init"), results),
                                nprocs=2, join=True)
    (x0, y0), (x1, y1) = center_batch(0), center_batch(1)
    zeros = [[0.0] * 3 for _ in range(4)]
    expected = torch.tensor(center_step_by_formula(zeros, torch.cat([x0, x1]), torch.cat([y0, y1]),
                                                   0.5))
    for rank in range(2):
        assert torch.allclose(torch.tensor(results[rank]), expected, atol=1e-6)
    local = torch.tensor(center_step_by_formula(zeros, x0, y0, 0.5))
    assert not torch.allclose(local, expected, atol=1e-3)  # a per-rank step would differ
