"""Every loss in configs/loss/ trains: on MobileFaceNet and synthetic faces the loss falls, and
every margin does what its paper says it does — it opens a wider angle between a sample's own
class center and the closest other center than the same loss with its margin set to zero."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import margin_configs
from hydra.utils import instantiate
from omegaconf import OmegaConf

from facetrain.backbones import MobileFaceNet
from facetrain.classifiers import FullClassCenters
from facetrain.data import FaceDataModule

LOSS_CONFIGS = margin_configs()  # every margin head of configs/loss/


def build(config: Path, embedding_size: int, num_classes: int, **overrides):
    margin = instantiate(OmegaConf.load(config), **overrides)
    return margin, FullClassCenters(embedding_size, num_classes, margin)


@pytest.fixture(scope="module")
def batches(tiny_faces):
    """Four fixed batches of 32 faces at 32x32 (small enough for 13 heads in seconds)."""
    datamodule = FaceDataModule(
        str(tiny_faces.train_root), {}, image_size=(32, 32), batch_size=32, num_workers=0
    )
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    return [next(loader) for _ in range(4)], datamodule.num_classes


@pytest.mark.parametrize("config", LOSS_CONFIGS, ids=lambda p: p.stem)
def test_loss_falls(config, batches):
    fixed_batches, num_classes = batches
    torch.manual_seed(0)
    backbone = MobileFaceNet(embedding_size=64, input_size=(32, 32))
    margin, centers = build(config, 64, num_classes)
    optimizer = torch.optim.AdamW(
        [*backbone.parameters(), *centers.parameters(), *margin.parameters()], lr=2e-3
    )
    step = 0

    def epoch_loss() -> float:
        nonlocal step
        total = 0.0
        for images, labels in fixed_batches:
            margin.set_step(step)
            loss = centers(backbone(images), labels, margin).loss
            extra = margin.extra_loss()
            if extra is not None:
                loss = loss + extra
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            assert torch.isfinite(loss), f"{config.stem}: non-finite loss"
            total += loss.item()
        return total / len(fixed_batches)

    first = epoch_loss()
    for _ in range(6):
        last = epoch_loss()
    assert last < 0.9 * first, f"{config.stem}: loss {first:.3f} -> {last:.3f} did not fall"


# Each margin's settings without its margin: the baseline it must beat. (Softmax, L2-Softmax
# and NormFace have no margin; the annealed heads are compared un-annealed, pure psi.)
WITHOUT_MARGIN = {
    "adaface": {"margin": 0.0},
    "amsoftmax": {"margin": 0.0},
    "arcface": {"margin": 0.0},
    "combined": {"m2": 0.0, "m3": 0.0},
    "cosface": {"margin": 0.0},
    "curricular": {"margin": 0.0},
    "lsoftmax": {"margin": 1},
    "magface": {"l_m": 0.0, "u_m": 0.0},
    "mvsoftmax": {"margin": 0.0},
    "sphereface": {"margin": 1},
    "subcenter": {"margin": 0.0},
}
UNANNEALED = {"base": 0.0, "lambda_min": 0.0}
N, D, C = 48, 16, 6


def angular_gap(config: Path, **overrides) -> float:
    """Mean of (angle to the closest other center − angle to the own center), in degrees,
    after training free embeddings (of norm 5) and the class centers on one fixed batch;
    computed here from the trained tensors in float64, not by the head."""
    torch.manual_seed(0)
    margin, centers = build(config, D, C, **overrides)
    direction = torch.nn.Parameter(torch.randn(N, D))
    labels = torch.arange(N) % C
    optimizer = torch.optim.Adam([direction, *centers.parameters()], lr=0.02)
    for step in range(200):
        margin.set_step(step)
        x = 5.0 * torch.nn.functional.normalize(direction, dim=1)  # only angles can move
        loss = centers(x, labels, margin).loss
        extra = margin.extra_loss()
        optimizer.zero_grad()
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
    k = getattr(margin, "subcenters", 1)
    unit_x = torch.nn.functional.normalize(x.detach().double(), dim=1)
    unit_w = torch.nn.functional.normalize(centers.weight.detach().double(), dim=1)
    theta = torch.rad2deg(torch.acos((unit_x @ unit_w.T).clamp(-1, 1)))
    theta = theta.view(N, C, k).amin(dim=2).numpy()  # nearest sub-center of each class
    own = theta[np.arange(N), labels.numpy()]
    theta[np.arange(N), labels.numpy()] = math.inf
    return float(np.mean(theta.min(axis=1) - own))


@pytest.mark.parametrize("stem", sorted(WITHOUT_MARGIN))
def test_the_margin_widens_the_angular_gap(stem):
    config = next(p for p in LOSS_CONFIGS if p.stem == stem)
    common = UNANNEALED if stem in ("sphereface", "lsoftmax") else {}
    with_margin = angular_gap(config, **common)
    without = angular_gap(config, **common, **WITHOUT_MARGIN[stem])
    assert with_margin > without + 10.0, (
        f"{stem}: angular gap {with_margin:.1f}° with its margin, {without:.1f}° without"
    )
