"""The TensorBoard views (ROC figures, embedding projector, margin histograms) are written by
``facetrain.callbacks`` from what the module exposes, and by nothing else; tiny in-memory fits."""

import ast
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from facetrain.callbacks import EmbeddingProjector, MarginHistograms, ROCFigures
from facetrain.classifiers import FullClassCenters
from facetrain.heads import ArcFace
from facetrain.module import FaceRecognitionModule

REPO = Path(__file__).resolve().parent.parent
EPOCHS, STEPS_PER_EPOCH, BATCH = 2, 5, 8


class TinyVerificationSet(Dataset):
    """12 images of 4 identities (3 each), 40 pairs alternating same / different identity."""

    name = "tiny"

    def __init__(self):
        self.images = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        self.identities = [f"id_{i // 3}" for i in range(12)]
        same = [(i, 3 * (i // 3) + (i + 1) % 3) for i in range(12)]
        different = [(i, (i + 3) % 12) for i in range(12)]
        pairs = [pair for two in zip(same, different, strict=True) for pair in two]
        self.pairs = np.array((pairs * 2)[:40])
        self.same = np.array([i // 3 == j // 3 for i, j in self.pairs])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], index


def fit(
    tmp_path: Path, callbacks: list, logger, validate_first: bool = False
) -> tuple[FaceRecognitionModule, nn.Module]:
    """Train 2 epochs of 5 steps, validating after each; ``validate_first``: a stand-alone
    validation before, as ``measure_baselines`` does."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16))
    head = ArcFace()
    module = FaceRecognitionModule(
        backbone, head, FullClassCenters(16, 5, head),
        optimizer=lambda g: torch.optim.SGD(g, lr=0.1), flip_test=False,
    )
    train = TensorDataset(torch.randn(STEPS_PER_EPOCH * BATCH, 3, 8, 8),
                          torch.arange(STEPS_PER_EPOCH * BATCH) % 5)
    verification = TinyVerificationSet()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=EPOCHS, logger=logger, callbacks=callbacks,
        log_every_n_steps=2, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    validation = DataLoader(verification, batch_size=5)
    if validate_first:
        trainer.validate(module, validation, verbose=False)
    trainer.fit(module, DataLoader(train, batch_size=BATCH), validation)
    return module, backbone


def read_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def test_module_holds_no_display_code():
    source = (REPO / "facetrain" / "module.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    assert not imported & {"facetrain.evaluation.plots", "facetrain.evaluation.projector",
                           "matplotlib"}, imported
    for call in ("add_figure", "add_embedding", "add_histogram", "add_image"):
        assert call not in source, call


def test_callbacks_write_roc_projector_and_histograms(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="", version="")
    callbacks = [ROCFigures(), EmbeddingProjector(samples=6, every_n_epochs=5),
                 MarginHistograms(every_n_steps=3)]
    module, backbone = fit(tmp_path, callbacks, logger, validate_first=True)
    events = read_events(Path(logger.log_dir))

    # One figure per validation: the stand-alone one at step 0, then each epoch's end; the sanity
    # check of fit draws nothing (not even the stand-alone validation's sets again).
    roc = events.Images("val/tiny/roc")
    expected_steps = [0] + [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    assert [image.step for image in roc] == expected_steps

    # Every 3rd optimizer step, labelled like that batch's scalars (steps count from 0); logging
    # every 2nd, so some steps bring their statistics and the others compute them.
    steps = [s - 1 for s in range(1, EPOCHS * STEPS_PER_EPOCH + 1) if s % 3 == 0]
    for tag in ("train/theta_y_deg", "train/theta_max_negative_deg"):
        histograms = events.Histograms(tag)
        assert [h.step for h in histograms] == steps, tag
        assert all(h.histogram_value.num == BATCH for h in histograms)
        assert all(0 <= h.histogram_value.min <= h.histogram_value.max <= 180 for h in histograms)

    # Epoch 2 of 2 is not a multiple of 5: projected once, after the last validation, with the
    # final weights. Each row is the embedding of one image of the set, labelled with its identity.
    (folder,) = {p.parent for p in Path(logger.log_dir).glob("*/*/metadata.tsv")}
    assert folder.parent.name == f"{EPOCHS * STEPS_PER_EPOCH:05d}" and folder.name == "tiny"
    labels = (folder / "metadata.tsv").read_text().split()
    rows = torch.tensor(np.loadtxt(folder / "tensors.tsv"), dtype=torch.float32)
    dataset = TinyVerificationSet()
    with torch.no_grad():
        expected = backbone(dataset.images)
    nearest = torch.cdist(rows, expected).argmin(dim=1)
    torch.testing.assert_close(rows, expected[nearest], atol=1e-4, rtol=1e-4)
    assert labels == [dataset.identities[i] for i in nearest]
    assert len(labels) == 6 and len(set(labels)) == 2  # whole identities of 3 images
    with Image.open(folder / "sprite.png") as sprite:
        assert sprite.size == (32 * 3, 32 * 3)  # ceil(sqrt(6)) thumbnails per side
    assert set(module.last_validation) == {"tiny"}


def test_without_the_callbacks_nothing_is_drawn(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="", version="")
    fit(tmp_path, [], logger)
    tags = read_events(Path(logger.log_dir)).Tags()
    assert "val/tiny/accuracy" in tags["scalars"]  # the module still logs its scalars
    assert not tags["images"] and not tags["histograms"]
    assert not list(Path(logger.log_dir).rglob("metadata.tsv"))


def test_callbacks_do_nothing_without_tensorboard(tmp_path):
    callbacks = [ROCFigures(), EmbeddingProjector(samples=6, every_n_epochs=1),
                 MarginHistograms(every_n_steps=1)]
    fit(tmp_path, callbacks, CSVLogger(tmp_path))
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    assert not list(tmp_path.rglob("metadata.tsv"))


@pytest.mark.parametrize("callback", [lambda: EmbeddingProjector(samples=0),
                                      lambda: MarginHistograms(every_n_steps=0)])
def test_off_is_dropping_the_callback(callback):
    with pytest.raises(ValueError, match=r"drop the callback \(~callbacks\.\w+\)"):
        callback()
