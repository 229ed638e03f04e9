"""Training images that fail to decode: each is replaced by the next image inside a DataLoader
worker, and the count and the first files still reach the main process — once per epoch as a
warning, and in the run's metrics.json."""

import io
import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import run_cli
from PIL import Image
from torch import nn

from facetrain.data import (
    FaceDataModule,
    LoadFailureReport,
    RecordDataset,
    pack_identity_folder,
    scan_identity_folder,
)
from facetrain.data.failures import LoadFailures


def truncate_jpeg(path: Path) -> Path:
    """Overwrite ``path`` with the first half of a noise JPEG: the header parses (the folder scan
    keeps the file), the body does not decode."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with Image.open(path) as image:
        assert image.size == (64, 64)  # the header is intact
    return path


@pytest.fixture
def folder(tmp_path) -> tuple[Path, Path]:
    """(root, the truncated file) of 3 identities × 4 images: 12 samples, 3 batches of 4."""
    root = tmp_path / "faces"
    for identity in "abc":
        (root / identity).mkdir(parents=True)
        for k in range(4):
            Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(root / identity / f"{k}.png")
    (root / "b" / "2.png").unlink()
    return root, truncate_jpeg(root / "b" / "2.jpg")


def datamodule(train_root: Path) -> FaceDataModule:
    module = FaceDataModule(
        str(train_root), {}, image_size=(8, 8), batch_size=4, num_workers=2, index_cache=None
    )
    module.setup("fit")
    return module


def test_folder_failures_in_two_workers_reach_the_main_process_per_epoch(folder):
    root, truncated = folder
    data = datamodule(root)
    assert len(data.train_set) == 12 and data.train_dataloader().num_workers == 2
    loader = data.train_dataloader()
    for _ in range(2):  # persistent workers: the same two processes load both epochs
        loaded = sum(len(labels) for _, labels in loader)
        assert loaded == 12  # batch 4 divides 12: every sample, the truncated one too, is loaded
        assert data.take_epoch_load_failures() == {"count": 1, "first": [str(truncated)]}
    assert data.take_epoch_load_failures() == {"count": 0, "first": []}
    assert data.load_failures() == {"count": 2, "first": [str(truncated)] * 2}
    assert data.train_set.failed_loads == {truncated: 2}


def test_record_failures_in_two_workers_name_the_record(folder, tmp_path):
    root, truncated = folder
    rec = pack_identity_folder(root, tmp_path / "pack")  # packs the JPEG's own (cut) bytes
    _, samples = scan_identity_folder(root, index_cache=None)
    key = [path for path, _ in samples].index(truncated) + 1  # insightface: images are 1..N
    data = datamodule(rec.parent)
    assert isinstance(data.train_set, RecordDataset)
    assert sum(len(labels) for _, labels in data.train_dataloader()) == 12
    assert data.load_failures() == {"count": 1, "first": [f"record {key} of {rec}"]}
    assert data.train_set.failed_loads == {key: 1}


def test_more_failures_than_kept_are_all_counted():
    failures = LoadFailures(keep=3)
    for sample in range(5):
        failures.add(sample)
    assert failures.run() == (5, [0, 1, 2])
    assert failures.take_epoch() == (5, [0, 1, 2])
    failures.add(7)
    assert failures.take_epoch() == (1, [7])
    assert failures.run() == (6, [0, 1, 2])


def test_a_pickled_copy_keeps_the_counts_but_not_the_sharing():
    failures = LoadFailures(keep=3)
    failures.add(4)
    copy = pickle.loads(pickle.dumps(failures))  # not a process start: a plain copy
    copy.add(5)
    assert copy.run() == (2, [4, 5])
    assert failures.run() == (1, [4])


class Linear(pl.LightningModule):
    """The smallest model a training epoch can run: flattened pixels → identity logits."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.layer = nn.Linear(3 * 8 * 8, num_classes)

    def training_step(self, batch, batch_index):
        images, labels = batch
        return nn.functional.cross_entropy(self.layer(images.flatten(1)), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_report_callback_warns_once_per_training_epoch(folder, caplog):
    root, truncated = folder
    data = datamodule(root)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[LoadFailureReport()],
    )
    with caplog.at_level(logging.WARNING, logger="facetrain.data.datamodule"):
        trainer.fit(Linear(data.num_classes), datamodule=data)
    reports = [r.getMessage() for r in caplog.records if r.name == "facetrain.data.datamodule"]
    assert reports == [
        f"epoch {epoch}: 1 training image(s) failed to decode and were replaced by the next "
        f"image; first: {truncated}"
        for epoch in (0, 1)
    ]


@pytest.mark.slow
def test_train_writes_the_failures_of_two_workers_into_metrics(tiny_faces, tmp_path):
    """``python train.py data=folder`` with the default two workers on a folder holding a
    truncated JPEG: metrics.json names it."""
    root = tmp_path / "faces"
    # identity folders only: another test may have left the folder's scan index beside them
    identities = sorted(p for p in tiny_faces.train_root.iterdir() if p.is_dir())
    for identity in identities[:8]:  # 8 × 10 images: 5 batches
        shutil.copytree(identity, root / identity.name)
    truncated = truncate_jpeg(root / "id_00003" / "0004.jpg")
    run_dir = tmp_path / "run"
    result = run_cli(
        "train.py", f"hydra.run.dir={run_dir}", "data=folder", f"data.train_root={root}",
        f"+data.verification.pairs={tiny_faces.pairs_file}", "data.image_size=[64,64]",
        "data.batch_size=16", "data.num_workers=2", "trainer.max_epochs=1",
        "measure_baselines=false", "model.flip_test=false", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["load_failures"] == {"count": 1, "first": [str(truncated)]}
    assert "epoch 0: 1 training image(s) failed to decode" in result.stderr + result.stdout
