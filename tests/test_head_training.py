"""Every head from configs/loss/ trains MobileFaceNet on synthetic faces: the loss falls."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from facetrain.backbones import MobileFaceNet
from facetrain.data import FaceDataModule

LOSS_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs" / "loss").glob("*.yaml"))


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
    head = instantiate(OmegaConf.load(config), embedding_size=64, num_classes=num_classes)
    optimizer = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=2e-3)

    def epoch_loss() -> float:
        total = 0.0
        for images, labels in fixed_batches:
            loss = F.cross_entropy(head(backbone(images), labels), labels)
            extra = head.extra_loss()
            if extra is not None:
                loss = loss + extra
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert torch.isfinite(loss), f"{config.stem}: non-finite loss"
            total += loss.item()
        return total / len(fixed_batches)

    first = epoch_loss()
    for _ in range(6):
        last = epoch_loss()
    assert last < 0.9 * first, f"{config.stem}: loss {first:.3f} -> {last:.3f} did not fall"
