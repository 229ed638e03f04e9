"""The metric losses, the center loss, focal and a combination train a real MobileFaceNet through
the training entry point's library call (``train(cfg)``, as ``python train.py`` runs it) on the
synthetic faces, and verify held-out identities clearly better than the untrained network."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import hydra_main_config, tiny_overrides
from hydra.utils import instantiate

from facetrain.checkpoint import load_backbone
from facetrain.data import FaceDataModule
from facetrain.heads import NormFace, Softmax
from facetrain.losses import CenterLoss, LossError, TripletLoss
from facetrain.module import FaceRecognitionModule
from facetrain.resources import config_dir
from facetrain.train import build_losses, train

LOSSES = sorted(p.stem for p in Path(config_dir(), "loss").glob("*.yaml"))

RUNS = {
    "contrastive": ["loss=contrastive"],
    "triplet": ["loss=triplet"],
    "softmax+center": ["loss=center"],
    "focal": ["loss=softmax", "classifier.focal_gamma=2"],
    "arcface+center": ["loss=arcface", "auxiliary=[center]", "loss.scale=16", "loss.margin=0.2"],
}
# 32x32 faces, three epochs of 25 steps: seconds per run on 2 cores. TensorBoard stays on (the
# terms' scalars are read back from it); histograms every 10 steps, so that they run too.
BUDGET = ["trainer.max_epochs=3", "data.image_size=[32,32]", "~callbacks.projector",
          "callbacks.histograms.every_n_steps=10"]


def run(faces, run_dir, *overrides):
    with hydra_main_config("train", *tiny_overrides(faces, run_dir), *BUDGET, *overrides) as cfg:
        return train(cfg)


@pytest.fixture(scope="module")
def trained(tiny_faces, tmp_path_factory):
    """Every run of RUNS, once: name -> (metrics, run folder)."""
    results = {}
    for name, overrides in RUNS.items():
        run_dir = tmp_path_factory.mktemp("metric") / name
        results[name] = run(tiny_faces, run_dir, *overrides), run_dir
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_each_loss_learns_to_verify_unseen_identities(trained, name):
    metrics, _ = trained[name]
    untrained = metrics["baselines"]["untrained"]["synthetic"]
    accuracy = metrics["verification"]["synthetic"]["accuracy"]
    assert accuracy >= untrained + 0.1, f"{name}: {untrained:.3f} untrained -> {accuracy:.3f}"
    assert metrics["nonfinite_skipped_steps"] == 0


@pytest.mark.slow
@pytest.mark.parametrize(("name", "scalars"), [
    ("arcface+center", {"train/loss", "train/classification_loss", "train/center_loss",
                        "train/center_distance", "train/accuracy"}),
    ("triplet", {"train/loss", "train/triplet_loss", "train/triplet_active_fraction",
                 "train/triplet_triplets"}),
])
def test_each_term_is_logged_on_its_own(trained, name, scalars):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = trained[name]
    (events,) = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    logged = set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert scalars <= logged, sorted(logged)
    if name == "triplet":  # no class centers: no head statistics
        assert "train/accuracy" not in logged and "train/classification_loss" not in logged


@pytest.mark.slow
def test_the_centers_are_checkpointed_and_sit_at_their_classes(trained, tiny_faces):
    """The center loss's centers are in the checkpoint, and (an independent check that they are
    the paper's centers) each class's mean training embedding, computed from the checkpoint's
    backbone (in eval mode, while the centers followed train-mode embeddings), is nearer its
    own center than any other class's for most classes (chance: 1 in 40)."""
    _, run_dir = trained["arcface+center"]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    centers = checkpoint["state_dict"]["losses.center.centers"]
    assert centers.shape == (tiny_faces.num_train_identities, 128)

    # a model built again as train.py builds it takes the checkpoint back, centers included
    overrides = [*tiny_overrides(tiny_faces, run_dir), *BUDGET, *RUNS["arcface+center"]]
    with hydra_main_config("train", *overrides) as cfg:
        backbone = instantiate(cfg.backbone)
        data = SimpleNamespace(num_classes=tiny_faces.num_train_identities, sampler=None)
        head, classifier, losses = build_losses(cfg, backbone.embedding_size, data,
                                                SimpleNamespace(global_rank=0, world_size=1))
    model = FaceRecognitionModule(backbone, head, classifier, torch.optim.SGD, losses=losses)
    model.load_state_dict(checkpoint["state_dict"])  # strict: every tensor has its place
    assert torch.equal(model.losses["center"].centers, centers) and centers.abs().sum() > 0

    backbone, info = load_backbone(run_dir)
    data = FaceDataModule(str(tiny_faces.train_root), {}, image_size=tuple(info["image_size"]),
                          batch_size=100, num_workers=0)  # no train_augmentations: plain images
    data.setup("fit")
    sums, counts = torch.zeros_like(centers), torch.zeros(len(centers))
    with torch.no_grad():
        for images, labels in data.train_dataloader():
            sums.index_add_(0, labels, backbone(images))
            counts.index_add_(0, labels, torch.ones(len(labels)))
    means = sums / counts.unsqueeze(1)
    nearest = torch.cdist(means, centers).argmin(dim=1)
    assert (nearest == torch.arange(len(centers))).float().mean() >= 0.5  # measured: 0.78


def test_a_metric_loss_without_identity_batches_stops_at_start_up(tiny_faces, tmp_path):
    with pytest.raises(LossError, match=r"triplet \(a TripletLoss\) is made of pairs .* add "
                                        r"data/sampler=identity_balanced"):
        run(tiny_faces, tmp_path / "run", "loss=triplet", "~data/sampler")


def test_a_margin_head_is_refused_as_an_auxiliary_term(tiny_faces, tmp_path):
    with pytest.raises(LossError, match="auxiliary.arc: facetrain.heads.ArcFace is not a loss on "
                                        "embeddings"):
        run(tiny_faces, tmp_path / "run", "+auxiliary.arc._target_=facetrain.heads.ArcFace")


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_config_builds_and_gives_a_finite_loss(loss, tmp_path):
    """Every configs/loss/ file as train.py builds it (the metric ones without class centers),
    and a loss with a finite gradient on a P x K batch."""
    with hydra_main_config("train", f"loss={loss}", f"hydra.run.dir={tmp_path}") as cfg:
        data = SimpleNamespace(num_classes=4, sampler=cfg.data.get("sampler"))
        head, classifier, losses = build_losses(
            cfg, 16, data, SimpleNamespace(global_rank=0, world_size=1))
    assert (head is None) == (classifier is None) == (loss in ("contrastive", "triplet"))
    if loss == "center":  # softmax + the center term
        assert isinstance(head, Softmax) and isinstance(losses["center"][1], CenterLoss)
    if loss == "triplet":
        assert isinstance(losses["triplet"][1], TripletLoss)
    if loss == "normface_triplet":
        assert isinstance(head, NormFace) and head.agent_loss == "triplet"
    embeddings = torch.randn(8, 16, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    total = classifier(embeddings, labels, head).loss if classifier is not None else 0
    extra = head.extra_loss() if head is not None else None
    total = total + (extra if extra is not None else 0)
    for weight, term in losses.values():
        total = total + weight * term(embeddings, labels).loss
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(embeddings.grad).all()


def built(tmp_path, *overrides):
    with hydra_main_config("train", *overrides, f"hydra.run.dir={tmp_path}") as cfg:
        data = SimpleNamespace(num_classes=4, sampler=cfg.data.get("sampler"))
        return build_losses(cfg, 16, data, SimpleNamespace(global_rank=0, world_size=1))


@pytest.mark.parametrize(("overrides", "message"), [
    (["loss=center", "auxiliary=[triplet]"], r"loss=center is softmax \+ auxiliary=\[center\], "
     r"and auxiliary=\[...\] replaced that term: add terms with \+auxiliary=\[...\] instead"),
    (["loss=triplet", "auxiliary=[triplet]"], r"auxiliary.triplet: the name is taken by "
     r"loss=triplet"),
    (["loss=triplet", "+auxiliary=[center]"], r"center \(a CenterLoss\) pulls embeddings to "
     r"class centers and collapses without a classification loss beside it"),
])
def test_a_combination_that_would_drop_or_misuse_a_term_is_refused(tmp_path, overrides, message):
    with pytest.raises(LossError, match=message):
        built(tmp_path, *overrides)
    _, _, losses = built(tmp_path, "loss=center", "+auxiliary=[triplet]")  # what works instead
    assert set(losses) == {"center", "triplet"}
