"""The TensorBoard views (ROC figures, embedding projector, margin histograms) are written by
``facetrain.callbacks`` from what the module exposes, and by nothing else; tiny in-memory fits.
The training throughput is checked against steps whose duration the test sets, and a real
two-process run against its own event times."""

import ast
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import run_cli, tiny_overrides
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from facetrain.callbacks import (
    EmbeddingProjector,
    MarginHistograms,
    ROCFigures,
    TrainingThroughput,
)
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
                                      lambda: MarginHistograms(every_n_steps=0),
                                      lambda: TrainingThroughput(warmup_steps=0)])
def test_off_is_dropping_the_callback(callback):
    with pytest.raises(ValueError, match=r"drop the callback \(~callbacks\.\w+\)"):
        callback()


# Throughput: steps of known duration. Micro-batches of TP_BATCH images sleep TP_STEP seconds
# (the first TP_SLOW_STEPS optimizer steps TP_SLOW_STEP: warm-up), validation TP_VALIDATION.
TP_BATCH, TP_ACCUMULATE, TP_STEPS_PER_EPOCH, TP_EPOCHS, TP_LOG_EVERY = 4, 2, 6, 2, 3
TP_STEP, TP_SLOW_STEP, TP_SLOW_STEPS, TP_VALIDATION = 0.05, 0.5, 3, 1.0


class SleepingSteps(pl.LightningModule):
    """A module whose steps take at least as long as the test says (time.sleep)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx: int):
        images, _ = batch
        time.sleep(TP_SLOW_STEP if self.global_step < TP_SLOW_STEPS else TP_STEP)
        loss = self.layer(images).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        time.sleep(TP_VALIDATION)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_throughput_is_images_over_the_window_of_steps_without_warm_up_or_validation(tmp_path):
    images = TP_STEPS_PER_EPOCH * TP_ACCUMULATE * TP_BATCH
    train = TensorDataset(torch.randn(images, 3), torch.zeros(images))
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=TP_EPOCHS, logger=logger,
        callbacks=[TrainingThroughput(warmup_steps=2)], log_every_n_steps=TP_LOG_EVERY,
        accumulate_grad_batches=TP_ACCUMULATE, num_sanity_val_steps=0,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(SleepingSteps(), DataLoader(train, batch_size=TP_BATCH),
                DataLoader(TensorDataset(torch.zeros(1, 3)), batch_size=1))
    events = read_events(Path(logger.log_dir))
    total = events.Scalars("train/images_per_second")
    per_process = events.Scalars("train/images_per_second_per_process")

    # Warm-up ends at the first logging step after 2 optimizer steps (step 3); then every logging
    # step (labelled, like Lightning's scalars, one below the optimizer steps taken).
    steps = range(2 * TP_LOG_EVERY, TP_EPOCHS * TP_STEPS_PER_EPOCH + 1, TP_LOG_EVERY)
    assert [e.step for e in total] == [s - 1 for s in steps] == [e.step for e in per_process]
    assert [e.value for e in total] == [e.value for e in per_process]  # one process
    # Each window holds TP_LOG_EVERY optimizer steps of TP_ACCUMULATE sleeping micro-batches:
    # at most TP_BATCH / TP_STEP images per second, a little less for Lightning's own work. With
    # the slow warm-up steps or the 1 s validation (inside the second window) counted, a window
    # would fall to a third or less.
    most = TP_BATCH / TP_STEP
    for event in total:
        assert 0.6 * most < event.value <= most * (1 + 1e-6), (event.step, event.value, most)
    # The progress bar shows the total as img/s; TensorBoard has the two long names only.
    assert trainer.progress_bar_metrics["img/s"] == pytest.approx(total[-1].value)
    assert "train/images_per_second" not in trainer.progress_bar_metrics
    assert "img/s" not in events.Tags()["scalars"]


def test_throughput_reads_no_tensor_and_counts_every_process():
    """The callback reads shapes only (a meta tensor has no data: reading one raises) and logs
    CPU tensors, so it adds no host-device synchronisation; the total is this process's rate
    times the world size. A stand-in trainer: only its step counters and world size are read."""
    callback = TrainingThroughput(warmup_steps=1)
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=2, world_size=4)
    logged = {}
    module = SimpleNamespace(log=lambda name, value, **_: logged.__setitem__(name, value))
    batch = (torch.empty(8, 3, 112, 112, device="meta"), torch.empty(8, device="meta"))
    callback.on_train_start(trainer, module)
    for step in range(1, 5):  # the window: from step 2's end (a logging step) to step 4's
        trainer.global_step = step
        if step == 2:
            before_window = time.perf_counter()
        callback.on_train_batch_end(trainer, module, None, batch, step - 1)
        if step == 4:
            after_window = time.perf_counter()
        time.sleep(0.05)
    assert set(logged) == {"train/images_per_second", "train/images_per_second_per_process",
                           "img/s"}
    assert all(value.device.type == "cpu" for value in logged.values())
    per_process = logged["train/images_per_second_per_process"].item()
    # steps 3 and 4: 16 images, in at least the two sleeps, at most the time around the calls
    assert 16 / (after_window - before_window) <= per_process <= 16 / 0.1
    assert logged["train/images_per_second"].item() == pytest.approx(4 * per_process)
    assert logged["img/s"].item() == logged["train/images_per_second"].item()


@pytest.mark.slow
def test_two_process_run_logs_throughput_matching_its_event_times(tiny_faces, tmp_path):
    """``python train.py trainer=ddp_cpu`` with the default callbacks: each window's rate is the
    images both ranks trained on over the wall time between Lightning's own scalar writes at the
    window's ends (less a validation inside it), and the total is twice the per-process rate."""
    run_dir, batch, every, world = tmp_path / "run", 16, 3, 2
    result = run_cli(
        "train.py", *tiny_overrides(tiny_faces, run_dir), "trainer=ddp_cpu",
        "trainer.max_epochs=2", f"trainer.log_every_n_steps={every}", "measure_baselines=false",
        "data.image_size=[32,32]", f"data.batch_size={batch}",
        "callbacks.throughput.warmup_steps=3", "~callbacks.projector", "~callbacks.histograms",
        "~callbacks.roc", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "img/s:" in result.stdout  # the progress bar
    events = read_events(run_dir / "tensorboard")
    total = events.Scalars("train/images_per_second")
    per_process = events.Scalars("train/images_per_second_per_process")
    written = {e.step: e.wall_time for e in events.Scalars("train/loss")}  # every logging step
    validated = {e.step: e.wall_time for e in events.Scalars("val/accuracy")}

    # 400 images, 200 a rank, 12 full batches a rank and epoch: 24 optimizer steps; windows of 3
    # from the first logging step after the 3 warm-up steps (step 3, labelled 2).
    steps_per_epoch = tiny_faces.num_train_identities * tiny_faces.images_per_train_identity
    steps_per_epoch //= world * batch
    labels = list(range(2 * every - 1, 2 * steps_per_epoch, every))
    assert [e.step for e in total] == labels == [e.step for e in per_process]
    for t, p in zip(total, per_process, strict=True):
        assert t.value == pytest.approx(world * p.value, rel=1e-6)
    # The validation ending epoch 1 starts right after step 12's scalars are written and ends
    # when its own are; it lies inside the window (12, 15] and does not count.
    (val_step,) = [s for s in validated if s < labels[-1]]
    assert val_step == steps_per_epoch - 1 and val_step in written
    for before, event in zip([labels[0] - every, *labels], total, strict=False):
        seconds = written[event.step] - written[before]
        if before <= val_step < event.step:
            seconds -= validated[val_step] - written[val_step]
        expected = world * batch * every / seconds
        assert event.value == pytest.approx(expected, rel=0.15), (event.step, expected)
