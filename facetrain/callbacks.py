"""What is shown, not trained: TensorBoard views of a run, one Lightning callback per view.

- ``ROCFigures``: each verification set's ROC curve at every validation (IMAGES tab; its numbers
  in PR CURVES).
- ``EmbeddingProjector``: a fixed sample of held-out embeddings with identity labels and
  thumbnails (PROJECTOR tab), every few epochs and after the last validation.
- ``MarginHistograms``: per-sample target angle and best non-target angle during training
  (HISTOGRAMS tab): the two move apart as the margin works.
- ``TrainingThroughput``: training images per second, per process and in total, on the progress
  bar and as scalars (reads the clock and batch shapes only).

The first three read what ``FaceRecognitionModule`` exposes: ``last_validation`` (per set: dataset,
embeddings, pair scores) and what ``training_step`` returns (the batch's embeddings, and its
statistics on logging steps; else ``head_statistics(embeddings, labels)``). Without a TensorBoard
logger they do nothing; only rank 0 writes.
"""

import time

import numpy as np
import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn

from facetrain.evaluation import roc_curve
from facetrain.evaluation.plots import plot_roc
from facetrain.evaluation.projector import projector_sample


def tensorboard_writer(trainer: Trainer):
    """The SummaryWriter of the run's TensorBoard logger, or None when it has none."""
    return next(
        (logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)),
        None,
    )


def _rank_zero_writer(trainer: Trainer):
    """The writer where this process should write after a validation, else None: not during
    the sanity check (a few batches, no verification), not without TensorBoard, not off rank 0.
    Lightning calls callbacks' ``on_validation_epoch_end`` before the module's, where the module
    computes the results; the views therefore run in ``on_validation_end``, after it."""
    if trainer.sanity_checking or not trainer.is_global_zero:
        return None
    return tensorboard_writer(trainer)


class ROCFigures(Callback):
    """Each verification set's ROC curve (TAR against log FAR) at every validation, as the
    figure ``val/<set>/roc`` and as its numbers, ``val/<set>/roc_counts``: TensorBoard's raw
    PR-curve record (PR CURVES tab) of the accepted same and different pairs at every distinct
    score, from which ``facetrain-compare`` overlays the final ROC curves of several runs."""

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = _rank_zero_writer(trainer)
        if writer is None:
            return
        for name, validated in pl_module.last_validation.items():
            same = np.asarray(validated.dataset.same, dtype=bool)
            far, tar, _ = roc_curve(validated.scores, same)
            figure = plot_roc({name: (far, tar)}, f"{name}, epoch {trainer.current_epoch}")
            writer.add_figure(f"val/{name}/roc", figure, trainer.global_step)
            # Counts, in TensorBoard's order (thresholds rising: fewer pairs accepted).
            positives, negatives = same.sum(), (~same).sum()
            tp, fp = np.rint(tar * positives)[::-1], np.rint(far * negatives)[::-1]
            writer.add_pr_curve_raw(
                f"val/{name}/roc_counts", tp, fp, negatives - fp, positives - tp,
                precision=tp / np.maximum(tp + fp, 1), recall=tp / max(positives, 1),
                global_step=trainer.global_step, num_thresholds=len(tp),
            )


class EmbeddingProjector(Callback):
    """Every ``every_n_epochs`` epochs, and after the last validation of training, ``samples``
    embeddings of each verification set (whole identities, the same images every time) with
    their identity labels and ``thumbnail_size`` thumbnails, tagged with the set's name."""

    def __init__(self, samples: int = 256, every_n_epochs: int = 5, thumbnail_size: int = 32):
        if samples < 1 or every_n_epochs < 1:
            raise ValueError(
                f"EmbeddingProjector needs samples >= 1 and every_n_epochs >= 1, got samples="
                f"{samples}, every_n_epochs={every_n_epochs}; to turn the projector off, drop "
                f"the callback (~callbacks.projector)"
            )
        self.samples = samples
        self.every_n_epochs = every_n_epochs
        self.thumbnail_size = thumbnail_size
        self._chosen: dict[str, tuple] = {}  # per set: indices, labels, thumbnails (read once)
        # The latest validation of fit not yet written (step, {set: sampled embeddings}): written
        # when training ends, so that the final model is always in the projector.
        self._unwritten: tuple[int, dict] | None = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = _rank_zero_writer(trainer)
        if writer is None:
            return
        sampled = {}
        for name, validated in pl_module.last_validation.items():
            if name not in self._chosen:
                self._chosen[name] = projector_sample(
                    validated.dataset, self.samples, self.thumbnail_size
                )
            indices = torch.as_tensor(self._chosen[name][0], device=validated.embeddings.device)
            sampled[name] = validated.embeddings[indices].float().cpu()
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._write(writer, trainer.global_step, sampled)
            self._unwritten = None
        elif trainer.state.fn == TrainerFn.FITTING:  # not a stand-alone trainer.validate()
            self._unwritten = (trainer.global_step, sampled)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if self._unwritten is not None and writer is not None:
            self._write(writer, *self._unwritten)
        self._unwritten = None

    def _write(self, writer, step: int, sampled: dict[str, torch.Tensor]) -> None:
        for name, embeddings in sampled.items():
            _, labels, thumbnails = self._chosen[name]
            writer.add_embedding(
                embeddings, metadata=labels, label_img=thumbnails, global_step=step, tag=name
            )


class MarginHistograms(Callback):
    """Histograms of ``train/theta_y_deg`` (angle to the own class center) and
    ``train/theta_max_negative_deg`` (to the closest other center) every ``every_n_steps``
    optimizer steps. They cost an extra class-matrix product, hence their own schedule."""

    def __init__(self, every_n_steps: int = 50):
        if every_n_steps < 1:
            raise ValueError(
                f"MarginHistograms needs every_n_steps >= 1, got {every_n_steps}; to turn the "
                f"histograms off, drop the callback (~callbacks.histograms)"
            )
        self.every_n_steps = every_n_steps
        self._last_step = 0  # with gradient accumulation several batches share one step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps taken, this batch's included
        if step % self.every_n_steps or step == self._last_step:
            return
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        if not isinstance(outputs, dict) or "embeddings" not in outputs:
            raise TypeError(
                "MarginHistograms needs training_step to return {'loss': ..., 'embeddings': ...}"
            )
        self._last_step = step
        # A logging step brings its statistics (taken before the optimizer step); otherwise every
        # rank computes them: with class centers sharded across ranks they are collective.
        stats = outputs.get("statistics")
        if stats is None:
            stats = pl_module.head_statistics(outputs["embeddings"], batch[1])
        if stats is None:  # metric losses only: no class centers, no angles to them
            return
        # Rank 0 writes, at the step Lightning logs this batch's scalars at.
        if trainer.is_global_zero:
            for name in ("theta_y", "theta_max_negative"):
                writer.add_histogram(f"train/{name}_deg", stats[name], step - 1)


class TrainingThroughput(Callback):
    """Training images per second, the figure insightface arcface_torch prints as "Speed ...
    samples/sec" (``utils_callbacks.CallBackLogging``: batch size per GPU × steps / seconds
    since its last report, × world size).

    At each logging step (``trainer.log_every_n_steps`` optimizer steps) it logs
    ``train/images_per_second_per_process`` (images this process trained on since the previous
    logging step, over the wall time between the two) and ``train/images_per_second`` (that ×
    the world size: DDP ranks step in lockstep on equal batches, the samplers giving every rank
    the same share), and shows the total on the progress bar as ``img/s``. The clock starts
    at the first logging step after ``warmup_steps`` optimizer steps of each fit (first-step
    allocations, autotuning, compilation, loader start-up) and stops during validation;
    everything else a run does between steps (data loading, epoch turnover, checkpoint writes)
    is training time, as in arcface_torch.

    No host-device synchronisation is added: the callback reads ``time.perf_counter``, optimizer
    step counts and the batch's shape (metadata), and logs CPU tensors, so nothing it does waits
    for the accelerator. Its times are when the host got through a step; every window begins
    and ends at the batch end of a logging step, so the host's lead over the device there (at
    most about a step: Lightning reads the progress-bar values back after every batch) is the
    same at both ends and cancels. Lightning's ``ThroughputMonitor`` instead calls
    ``torch.cuda.synchronize()`` after every batch, writes past the progress bar and wants a
    FLOP count.
    """

    def __init__(self, warmup_steps: int = 10):
        if warmup_steps < 1:
            raise ValueError(
                f"TrainingThroughput needs warmup_steps >= 1 (the first step is never "
                f"representative), got {warmup_steps}; to turn the throughput display off, drop "
                f"the callback (~callbacks.throughput)"
            )
        self.warmup_steps = warmup_steps
        self._reset(global_step=0)

    def _reset(self, global_step: int) -> None:
        self._steps = 0  # optimizer steps of this fit so far
        self._last_global_step = global_step  # unchanged at a batch end: gradients accumulate
        self._started: float | None = None  # when the window began; None during warm-up
        self._images = 0  # images this process trained on since the window began
        self._paused: float | None = None  # when the running validation began

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset(trainer.global_step)  # a resumed fit warms up again

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        self._images += batch[0].shape[0]  # the images of an (images, labels) batch
        if trainer.global_step == self._last_global_step:
            return
        self._last_global_step = trainer.global_step
        self._steps += 1
        # Lightning writes logged values at the optimizer steps that are multiples of this.
        every = trainer.log_every_n_steps
        if every == 0 or trainer.global_step % every:
            return
        if self._started is None:  # warming up: the first window begins at a logging step too
            if self._steps >= self.warmup_steps:
                self._started, self._images = now, 0
            return
        per_process = self._images / (now - self._started)
        total = per_process * trainer.world_size
        log = {"on_step": True, "on_epoch": False}
        pl_module.log("train/images_per_second", torch.tensor(total), **log)
        pl_module.log("train/images_per_second_per_process", torch.tensor(per_process), **log)
        pl_module.log("img/s", torch.tensor(total), prog_bar=True, logger=False, **log)
        self._started, self._images = now, 0

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._paused = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._started is not None and self._paused is not None:
            self._started += time.perf_counter() - self._paused
        self._paused = None
