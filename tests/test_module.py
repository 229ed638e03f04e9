"""The LightningModule's wiring: parameter groups, non-finite loss, verification at epoch end."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from facetrain.classifiers import FullClassCenters
from facetrain.heads import ArcFace
from facetrain.module import FaceRecognitionModule


def arcface_module(backbone: nn.Module, num_classes: int = 3, **options) -> FaceRecognitionModule:
    head = ArcFace()
    centers = FullClassCenters(backbone.embedding_size, num_classes, head)
    return FaceRecognitionModule(
        backbone, head, centers, optimizer=lambda g: torch.optim.SGD(g, lr=0.1), **options
    )


class Constant(nn.Module):
    embedding_size = 4

    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, images):
        return torch.full((images.shape[0], self.embedding_size), self.value) * self.scale


def test_parameter_groups_get_their_own_weight_decay():
    module = arcface_module(Constant(1.0), weight_decay={"backbone": 1e-4, "head": 0.0})
    optimizer = module.configure_optimizers()
    backbone_group, head_group = optimizer.param_groups
    assert backbone_group["weight_decay"] == 1e-4 and head_group["weight_decay"] == 0.0
    assert head_group["params"][0] is module.classifier.weight


def test_non_finite_loss_stops_with_advice():
    module = arcface_module(Constant(float("nan")))
    module.trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, log_every_n_steps=1)
    batch = (torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(FloatingPointError, match="lower optimizer.lr"):
        module.training_step(batch, 0)


def test_validation_embeddings_are_placed_by_image_index():
    """Batches arrive in any order; each embedding must land at its image's index."""
    flatten = nn.Flatten()
    flatten.embedding_size = 4
    module = arcface_module(flatten)
    rng = np.random.default_rng(0)
    images = torch.tensor(rng.normal(size=(6, 1, 2, 2)), dtype=torch.float32)
    module._val_embeddings[0] = [
        (torch.tensor([4, 5, 0]), images[[4, 5, 0]].flatten(1)),
        (torch.tensor([1, 3, 2]), images[[1, 3, 2]].flatten(1)),
    ]
    module.trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False)
    placed = module._gather_embeddings(0, num_images=6)
    torch.testing.assert_close(placed, images.flatten(1))


SYNCS = ("item", "__bool__", "__float__", "__int__", "cpu", "tolist", "numpy")


class SyncCounter:
    """Counts the tensor calls that make the host wait for the device (on a GPU) while on."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self.on = False
        for name in SYNCS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                if self.on:
                    self.calls.append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("margin", ["ArcFace", "CurricularFace", "AdaFace", "SphereFace"])
def test_training_step_without_logging_never_waits_for_the_device(margin, monkeypatch):
    """On steps that do not log, nothing in the training step reads a tensor back to the host
    (on a GPU each read is a device-to-host wait): the non-finite check, the head's state
    metrics and its statistics stay on the device."""
    from facetrain import heads

    counter = SyncCounter(monkeypatch)
    head = getattr(heads, margin)()

    class Counted(FaceRecognitionModule):
        def training_step(self, batch, batch_idx):
            counter.on = not self._is_logging_step()
            try:
                return super().training_step(batch, batch_idx)
            finally:
                counter.on = False

    backbone = nn.Sequential(nn.Flatten(), nn.Linear(48, 8))
    backbone.embedding_size = 8
    module = Counted(backbone, head, FullClassCenters(8, 5, head),
                     optimizer=lambda g: torch.optim.SGD(g, lr=0.1))
    data = torch.utils.data.TensorDataset(torch.randn(24, 3, 4, 4), torch.arange(24) % 5)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=6, log_every_n_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert trainer.global_step == 6
    assert counter.calls == [], f"host syncs in a non-logging training step: {counter.calls}"


def test_checkpoints_from_before_the_class_center_split_still_load():
    """Runs saved when the head owned the class centers (``head.weight``, ``head.bias``) resume:
    the keys move to the classifier and every tensor lands where it belongs."""
    from facetrain.heads import Softmax

    head = Softmax(bias=True)
    module = FaceRecognitionModule(
        Constant(1.0), head, FullClassCenters(4, 3, head),
        optimizer=lambda g: torch.optim.SGD(g, lr=0.1),
    )
    old = {key.replace("classifier.", "head."): torch.randn_like(value)
           for key, value in module.state_dict().items()}
    assert {"head.weight", "head.bias"} <= set(old)
    checkpoint = {"state_dict": dict(old)}
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(module.classifier.weight, old["head.weight"])
    assert torch.equal(module.classifier.bias, old["head.bias"])
