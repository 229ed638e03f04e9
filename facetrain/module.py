"""The LightningModule: backbone → embedding → class centers + margin → cross-entropy, plus
weighted metric-loss terms on the embeddings (or those alone). Wiring, optimisation and logging
only; the model math lives in ``backbones/``, ``classifiers/``, ``heads/`` and ``losses/``.

Mixed precision (``trainer.precision=16-mixed`` or ``bf16-mixed``) is Lightning's: the backbone
runs under autocast, the class-center stores turn autocast off and compute cosines, margins and
cross-entropy in float32, and under 16-mixed Lightning's GradScaler scales the loss. What this
module adds is that no step trains through a NaN: a step whose loss or gradients are not finite
changes nothing (``model.nonfinite``, see ``on_before_optimizer_step``).
"""

import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from facetrain.checkpoint import METADATA_KEY, check_resume, upgrade_state_dict
from facetrain.classifiers import ClassCenters
from facetrain.data.images import DatasetError
from facetrain.distributed import (
    all_gather_rows,
    all_gather_uneven,
    all_reduce_sum,
    is_distributed,
)
from facetrain.evaluation import embed, kfold_verification, pair_scores
from facetrain.heads import Margin
from facetrain.losses import EmbeddingLoss

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("skip", "stop")
NONFINITE_KEY = "facetrain_nonfinite"  # the checkpoint's entry: the counts survive a resume
RESUME_ADVICE = (
    "lower optimizer.lr or add warm-up, then resume from the last good checkpoint in the run's "
    "checkpoints/ folder with ckpt_path=..."
)


class TrainingError(RuntimeError):
    """Training cannot go on as configured; the message says what to change (the command line
    prints it as ``facetrain: training error: ...``, without a traceback)."""


class NonFiniteError(TrainingError, FloatingPointError):
    """The run stopped on non-finite losses or gradients (``model.nonfinite``)."""


class StepTensors(NamedTuple):
    """What every training step visits, listed once per fit (``FaceRecognitionModule.
    step_tensors``)."""

    parameters: list[nn.Parameter]  # all of them: the non-finite check, a skip drops their grads
    backbone: list[nn.Parameter]  # gradient clipping
    buffers: list[torch.Tensor]  # snapshot before the step, put back by a skipped one


class ValidatedSet(NamedTuple):
    """One verification set at the end of a validation epoch, for callbacks to show."""

    dataset: Any  # name, pairs, same, identities; yields (image, image index)
    embeddings: torch.Tensor  # (images, D), placed by image index, gathered across ranks
    scores: np.ndarray  # cosine score of each pair


def non_finite_tensors(tensors) -> torch.Tensor:
    """How many devices hold a ``tensors`` element (None skipped) that is nan or inf: a (1,)
    long tensor on the first one's device, no host sync. The GradScaler's own fused check (its
    unscale by a factor of 1, which changes no value): one kernel per device; the largest
    |value| (``get_total_norm(tensors, inf)``) takes ~15x as long on CPU."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor is not None:
            by_device.setdefault(tensor.device, []).append(tensor)
    counts = []
    for device, group in by_device.items():
        found = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, torch.ones(1, device=device))
        counts.append(found)
    if not counts:
        return torch.zeros(1, dtype=torch.long)
    first = counts[0].device
    return torch.stack([c.to(first) for c in counts]).sum(0).long()


class FaceRecognitionModule(pl.LightningModule):
    """Trains ``backbone`` + ``head`` (a margin, ``facetrain.heads``) on the class centers of
    ``classifier`` (``facetrain.classifiers``) with cross-entropy, plus ``losses``: named
    ``(weight, EmbeddingLoss)`` terms on the embeddings (``facetrain.losses``: center loss,
    triplet, ...); the loss optimised is the cross-entropy plus the weighted terms, each logged
    on its own. A pure metric loss has no head and no classifier (both None): the terms alone.
    Validates on verification pairs.

    ``optimizer`` is a factory taking parameter groups (a Hydra ``_partial_``);
    ``scheduler`` takes the optimizer and the total number of optimizer steps.
    ``weight_decay`` gives each parameter group its own decay: ``{"backbone": .., "head": ..}``.
    ``description`` (plain containers: configs, input size, normalisation; see
    ``facetrain.checkpoint.describe_model``) is stored in every checkpoint so that the model can
    be rebuilt and checked without the training config. What is shown (ROC figures, projector,
    histograms) is drawn by ``facetrain.callbacks`` from ``last_validation`` and
    ``head_statistics``; ``training_step`` returns the batch's embeddings beside the loss.

    ``nonfinite``: what a step whose loss or gradients are not finite does. ``"skip"``: nothing
    (no optimizer step, BatchNorm statistics and the margin's state put back), counted as
    ``train/nonfinite_skipped`` with a warning naming the step; ``max_nonfinite_in_a_row`` such
    steps in a row stop the run (``NonFiniteError``): it is diverging, not meeting a bad batch.
    ``"stop"``: the first one stops the run. fp16 loss-scaling overflows are the GradScaler's
    business (it skips the step and lowers its scale): counted as ``train/amp_overflow_steps``.

    ``compile``: the backbone's training forward runs through ``torch.compile`` (inductor);
    weights, checkpoints and validation are those of the uncompiled backbone.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: Margin | None,
        classifier: ClassCenters | None,
        optimizer: Callable,
        scheduler: Callable | None = None,
        weight_decay: Mapping[str, float] | None = None,
        flip_test: bool = True,
        channels_last: bool = False,
        compile: bool = False,
        description: Mapping | None = None,
        nonfinite: str = "skip",
        max_nonfinite_in_a_row: int = 5,
        losses: Mapping[str, tuple[float, EmbeddingLoss]] | None = None,
    ):
        super().__init__()
        losses = dict(losses or {})
        if (head is None) != (classifier is None) or (classifier is None and not losses):
            raise TrainingError(
                "the model needs a margin head with its class centers, metric-loss terms, or "
                "both: check loss= and auxiliary="
            )
        if nonfinite not in NONFINITE_POLICIES:
            raise TrainingError(f"model.nonfinite must be skip or stop, got {nonfinite!r}")
        if int(max_nonfinite_in_a_row) < 1:
            raise TrainingError(
                f"model.max_nonfinite_in_a_row must be at least 1, got {max_nonfinite_in_a_row}"
            )
        self.backbone = backbone
        self.head = head
        self.classifier = classifier
        self.losses = nn.ModuleDict({name: loss for name, (_, loss) in losses.items()})
        self.loss_weights = {name: float(weight) for name, (weight, _) in losses.items()}
        self.sharded = classifier is not None and classifier.sharded
        if self.sharded:  # each rank's shard has its own gradient: DDP must not average it
            self._ddp_params_and_buffers_to_ignore = [
                f"classifier.{name}" for name, _ in classifier.named_parameters()
            ]
        self.nonfinite, self.max_nonfinite_in_a_row = nonfinite, int(max_nonfinite_in_a_row)
        self.nonfinite_skipped = 0  # steps skipped for a non-finite loss or gradient, in all
        self.amp_overflow_steps = 0  # steps the fp16 GradScaler skipped (overflowed gradients)
        self._nonfinite_in_a_row = 0
        self._stopped: NonFiniteError | None = None  # why the run stopped: nothing is saved after
        # The optimizer step in progress: [non-finite losses, non-finite embedding rows] of its
        # forwards (device counts, read once in on_before_optimizer_step), its rows, its last
        # forward's (embeddings, labels) for the warning's statistics.
        self._step_flags: torch.Tensor | None = None
        self._step_rows = 0
        self._last_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._buffer_snapshot: list[torch.Tensor] | None = None  # the buffers before the step
        self._step_tensors: StepTensors | None = None
        self._snapshot_due = True
        self._labels_checked = False
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.weight_decay = dict(weight_decay or {"backbone": 5e-4, "head": 5e-4})
        self.flip_test = flip_test
        self.channels_last = channels_last
        if channels_last:  # NHWC convolutions: ~1.6x faster MobileFaceNet steps on CPU (oneDNN)
            self.backbone.to(memory_format=torch.channels_last)
        if not isinstance(compile, bool):
            raise TrainingError(f"model.compile must be true or false, got {compile!r}")
        # The training forward through torch.compile, built lazily at the first step. Kept as a
        # plain function beside the module, not registered in it: parameters, buffers and
        # state_dict names stay the backbone's own (no ``_orig_mod.``), so a compiled run's
        # checkpoint loads into an uncompiled run, facetrain-eval and export, and resumes either
        # way. Validation stays eager: eval mode under inference mode, with a last batch of
        # another size, would be more graphs to compile for a few batches per epoch.
        self._compiled_forward = torch.compile(self.backbone.forward) if compile else None
        self.description = dict(description) if description is not None else None
        self.verification_results: dict[str, dict[str, float]] = {}
        self.last_validation: dict[str, ValidatedSet] = {}  # the latest validation, per set
        self._val_embeddings: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def _memory_format(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def on_train_start(self) -> None:
        # The model sits on its device now: moving it replaced its buffer tensors.
        self._buffer_snapshot, self._snapshot_due, self._step_tensors = None, True, None
        self._check_clipping_sees_unscaled_gradients()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.head is not None:  # annealing counts optimizer steps, not forwards
            self.head.set_step(self.global_step)
        if not self._labels_checked:
            self._check_labels(batch[1])
            self._labels_checked = True
        if self.nonfinite == "skip" and self._snapshot_due:  # the step's first forward
            self._snapshot_buffers()

    def step_tensors(self) -> StepTensors:
        """The parameters and buffers the step's checks visit, listed at the first step of each
        fit: walking the module tree costs ~0.5 ms a walk on a CPU (MobileFaceNet: 183
        parameters, 150 buffers), three walks a step, against the 1.02x framework-overhead aim
        (benchmarks.framework_overhead). Parameters keep their identity through ``.to()``;
        buffers are updated in place (BatchNorm, every margin's state), never reassigned."""
        if self._step_tensors is None:
            self._step_tensors = StepTensors(
                list(self.parameters()), list(self.backbone.parameters()), list(self.buffers())
            )
        return self._step_tensors

    def _is_logging_step(self) -> bool:
        # Lightning writes logged on-step values on the steps where (step + 1) %
        # log_every_n_steps == 0 and when the run stops (its should_update_logs), never with 0.
        every = self.trainer.log_every_n_steps
        return bool(every) and ((self.global_step + 1) % every == 0 or self.trainer.should_stop)

    def training_step(self, batch, batch_idx: int) -> dict:
        images, labels = batch
        labels = labels.long()  # any integer dtype (checked on the first batch); gather takes int64
        embeddings = (self._compiled_forward or self.backbone)(self._memory_format(images))
        # Values are logged on the steps Lightning writes them, the logging steps, only: each
        # self.log costs ~0.3 ms of CPU, the framework's largest per-step cost after the model
        # (benchmarks.framework_overhead). The progress bar shows the latest logging step's.
        logging_step = self._is_logging_step()
        loss, statistics = self._classification_loss(embeddings, labels, logging_step)
        for name, term in self.losses.items():
            output = term(embeddings, labels)
            if logging_step:
                self.log(f"train/{name}_loss", output.loss)  # unweighted: comparable by weight
                for metric, value in output.metrics.items():
                    self.log(f"train/{name}_{metric}", value)
            weighted = self.loss_weights[name] * output.loss
            loss = weighted if loss is None else loss + weighted
        self._note_forward(loss, embeddings, labels)
        if logging_step:
            self.log("train/loss", loss, prog_bar=True)
        # embeddings and statistics for the callbacks' batch-end hooks (histograms)
        return {"loss": loss, "embeddings": embeddings.detach(), "statistics": statistics}

    def _classification_loss(self, embeddings: torch.Tensor, labels: torch.Tensor,
                             logging_step: bool) -> tuple[torch.Tensor | None, dict | None]:
        """The head's cross-entropy (and its extra term); on a ``logging_step``, logged with the
        head's state and statistics. (None, None) without a head."""
        if self.classifier is None:
            return None, None
        output = self.classifier(embeddings, labels, self.head, statistics=logging_step)
        loss = output.loss
        if self.losses and logging_step:
            self.log("train/classification_loss", loss)
        extra = self.head.extra_loss()
        if extra is not None:
            if logging_step:
                self.log("train/head_extra_loss", extra)
            loss = loss + extra
        if logging_step:
            for name, value in self.head.state_metrics().items():  # lambda, t, learnt scale, ...
                self.log(f"train/head_{name}", value)
        if output.statistics is not None:
            self._log_head_statistics(output.statistics)
        return loss, output.statistics

    def _note_forward(self, loss: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor
                      ) -> None:
        """Count this forward's non-finite loss and embedding rows into the optimizer step's, on
        the device: no host sync here (read once per step in ``on_before_optimizer_step``)."""
        embeddings = embeddings.detach()
        flags = torch.stack([
            (~torch.isfinite(loss.detach())).sum(), (~torch.isfinite(embeddings)).any(dim=1).sum()
        ])
        self._step_flags = flags if self._step_flags is None else self._step_flags + flags
        self._step_rows += embeddings.shape[0]
        self._last_batch = (embeddings, labels)

    @torch.no_grad()
    def head_statistics(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict | None:
        """The head's view of a batch: per-sample ``theta_y`` and ``theta_max_negative`` in
        degrees, and batch scalars (``ClassCenters.statistics``); None without a head."""
        if self.classifier is None:
            return None
        return self.classifier.statistics(embeddings, labels, self.head)

    @staticmethod
    def _head_scalars(stats: dict) -> dict[str, torch.Tensor]:
        """The batch scalars of ``head_statistics``, by their logged names."""
        return {
            "accuracy": stats["accuracy"],
            "theta_y_deg": stats["theta_y"].mean(),
            "theta_max_negative_deg": stats["theta_max_negative"].mean(),
            "cos_max_negative": stats["cos_max_negative"],
            "hard_negative_fraction": stats["hard_negative_fraction"],
        }

    def _log_head_statistics(self, stats: dict) -> None:
        for name, value in self._head_scalars(stats).items():
            self.log(f"train/{name}", value, prog_bar=name == "accuracy")

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, indices = batch
        embeddings = embed(self.backbone, self._memory_format(images), self.flip_test)
        self._val_embeddings.setdefault(dataloader_idx, []).append((indices, embeddings))

    def on_validation_epoch_start(self) -> None:
        self._val_embeddings.clear()
        self.last_validation.clear()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # a few batches only: no meaningful verification
            self._val_embeddings.clear()
            return
        accuracies = []
        for loader_idx, dataset in enumerate(self._verification_datasets()):
            embeddings = self._gather_embeddings(loader_idx, len(dataset))
            scores = pair_scores(embeddings, dataset.pairs)
            result = kfold_verification(scores, dataset.same)
            self.verification_results[dataset.name] = result.as_dict()
            for key, value in result.scalars().items():
                self._log_verification(f"val/{dataset.name}/{key}", value)
            self.last_validation[dataset.name] = ValidatedSet(dataset, embeddings, scores)
            accuracies.append(result.accuracy)
            if self.trainer.is_global_zero:  # every rank has the same result: print it once
                log.info(
                    "epoch %d, %s: verification accuracy %.4f ± %.4f, AUC %.4f", self.current_epoch,
                    dataset.name, result.accuracy, result.accuracy_std, result.auc,
                )
        self._log_verification("val/accuracy", float(np.mean(accuracies)), prog_bar=True)
        self._val_embeddings.clear()

    def _log_verification(self, name: str, value: float, prog_bar: bool = False) -> None:
        # Every rank scored the same gathered embeddings: the value is the same on each (and
        # each rank's checkpoint callback reads it). Lightning asks for epoch-level values to be
        # synced under DDP; a max, unlike its default mean, returns the shared value unchanged.
        self.log(name, value, prog_bar=prog_bar, add_dataloader_idx=False, sync_dist=True,
                 reduce_fx="max")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Never a file of weights that are not good, so that the last checkpoint stays the last
        # good one: none once the run stopped on non-finite steps (an exception callback may
        # still try to save), and none of weights that are not finite themselves (a finite step
        # can overshoot into inf; the steps after are skipped, but the weights are lost).
        if self._stopped is not None:
            raise self._stopped
        self._check_weights_finite()
        checkpoint[NONFINITE_KEY] = {
            "skipped": self.nonfinite_skipped, "in_a_row": self._nonfinite_in_a_row,
            "amp_overflow_steps": self.amp_overflow_steps,
        }
        if self.description is not None:
            checkpoint[METADATA_KEY] = self.description
        if self.sharded:  # the centers' optimizer state, whole (see PartialFC)
            self._convert_center_state(checkpoint, self.classifier.full_rows, rows=None)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        upgrade_state_dict(checkpoint["state_dict"])
        counts = checkpoint.get(NONFINITE_KEY, {})
        self.nonfinite_skipped = counts.get("skipped", 0)
        self._nonfinite_in_a_row = counts.get("in_a_row", 0)
        self.amp_overflow_steps = counts.get("amp_overflow_steps", 0)
        if self.sharded:
            self._convert_center_state(
                checkpoint, self.classifier.own_rows, rows=self.classifier.num_classes
            )
        if self.description is not None:
            check_resume(checkpoint, self.description, self)

    def _convert_center_state(self, checkpoint: dict, convert: Callable, rows: int | None) -> None:
        """Apply ``convert`` to the per-center optimizer state (momentum, Adam moments) of the
        sharded class centers; ``rows``: only tensors with that many rows (None: the shard's)."""
        weight = self.classifier.weight
        rows = weight.shape[0] if rows is None else rows
        order = [p for group in self._parameter_groups() for p in group["params"]]
        position = next(i for i, p in enumerate(order) if p is weight)
        for optimizer_state in checkpoint.get("optimizer_states", []):
            states = optimizer_state.get("state", {})
            if position not in states:
                continue
            # A new dict: optimizer.state_dict() shares the live per-parameter state with the
            # optimizer, and converting that in place would give it the whole matrix's rows.
            states[position] = {
                key: convert(value)
                if torch.is_tensor(value) and value.ndim and value.shape[0] == rows else value
                for key, value in states[position].items()
            }

    # -- no step trains through a NaN ------------------------------------------------------

    def _loss_scaler(self) -> torch.amp.GradScaler | None:
        """The GradScaler of 16-mixed (None under every other precision)."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Let the step change the model only if its losses and gradients are finite.

        Lightning calls this after the backward (and, under 16-mixed, after the GradScaler's
        ``unscale_``), before clipping and the optimizer step. A non-finite step gets no update:
        every gradient is set to None, so the optimizer skips every parameter (no step, no weight
        decay, no momentum or Adam moment change), and the buffers the forward moved (BatchNorm
        running statistics, the margin's running state) are put back. The learning-rate
        schedule still advances, as when arcface_torch's GradScaler skips a step.

        The decision reads the device once per step (a host sync, like the GradScaler's own
        ``found_inf`` read every step under 16-mixed) and under DDP all-reduces four numbers
        first (one small collective per step): every rank must decide alike, or the replicas and
        their optimizer states diverge. Replicated gradients are already all-reduced here, but a
        non-finite loss with finite gradients, or a non-finite Partial-FC shard gradient, shows
        on one rank only.
        """
        if self._step_flags is None:  # no forward in this step
            return
        flags = torch.cat([
            self._step_flags,
            non_finite_tensors([p.grad for p in self.step_tensors().parameters]).to(
                self._step_flags.device),
            self._step_flags.new_tensor([self._step_rows]),
        ])
        bad_loss, bad_rows, bad_gradients, rows = all_reduce_sum(flags).tolist()
        self._step_flags, self._step_rows, self._snapshot_due = None, 0, True
        if not bad_loss and not bad_gradients:
            self._nonfinite_in_a_row = 0
        elif not bad_loss and self._loss_scaler() is not None:
            # fp16 loss scaling overflowed: the GradScaler skips this step and lowers its scale,
            # its normal business (several times while the scale settles), not a failure. The
            # gradients go too: a rank whose own scaler saw no overflow (a non-finite gradient
            # in another rank's Partial-FC shard) must not step alone.
            self.amp_overflow_steps += 1
            self._drop_gradients()
            if self._loss_scaler().get_scale() < 1:  # overflows even scaled down: not settling
                self._skip_or_stop(False, int(bad_rows), int(rows))
        else:
            self._skip_or_stop(bool(bad_loss), int(bad_rows), int(rows))
        if self._is_logging_step():
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))
            if self._loss_scaler() is not None:
                self.log("train/amp_overflow_steps", float(self.amp_overflow_steps))

    def _skip_or_stop(self, bad_loss: bool, bad_rows: int, rows: int) -> None:
        """A step whose loss (``bad_loss``) or else gradients are not finite; ``bad_rows`` of
        the global batch's ``rows`` embeddings were not finite."""
        self._nonfinite_in_a_row += 1
        what = "loss is" if bad_loss else "gradients are"
        epoch = self.current_epoch
        if self.nonfinite == "stop" or self._nonfinite_in_a_row >= self.max_nonfinite_in_a_row:
            first = self.global_step - self._nonfinite_in_a_row + 1
            if self.nonfinite == "stop":
                why = f"(epoch {epoch}; model.nonfinite=stop)"
            else:
                why = (f"(epoch {epoch}) on {self._nonfinite_in_a_row} steps in a row, each "
                       f"skipped but the last (model.max_nonfinite_in_a_row="
                       f"{self.max_nonfinite_in_a_row}): the run is diverging")
            if self._loss_scaler() is not None:  # a float16 forward can overflow to inf
                why += "; float16 activations may overflow: try trainer.precision=bf16-mixed"
            self._stopped = NonFiniteError(
                f"training {what} not finite (nan or inf) since step {first} {why}; {RESUME_ADVICE}"
            )
            raise self._stopped
        self.nonfinite_skipped += 1
        statistics = self._step_statistics()  # every rank: a collective under Partial-FC
        if self.trainer.is_global_zero:
            rows_note = (f"; {bad_rows} of the batch's {rows} embeddings not finite"
                         + (" (check those images)" if bad_rows < rows else ""))
            log.warning(
                "step %d (epoch %d): training %s not finite (nan or inf)%s; skipped: no update, "
                "BatchNorm and head state put back (%d in a row, the run stops at %d "
                "[model.max_nonfinite_in_a_row]; %d skipped in all). Head at this step: %s",
                self.global_step, epoch, what, rows_note if bad_rows else "",
                self._nonfinite_in_a_row, self.max_nonfinite_in_a_row, self.nonfinite_skipped,
                statistics,
            )
        self._restore_buffers()
        self._drop_gradients()

    def _step_statistics(self) -> str:
        """The head's statistics and state on the step's last batch, for the skip warning."""
        statistics = self.head_statistics(*self._last_batch)
        if statistics is None:
            return "no head (metric losses only)"
        values = self._head_scalars(statistics)
        values.update({f"head_{name}": value for name, value in self.head.state_metrics().items()})
        return ", ".join(f"{name}={float(value):.4g}" for name, value in values.items())

    def _drop_gradients(self) -> None:
        for parameter in self.step_tensors().parameters:
            parameter.grad = None

    def _snapshot_buffers(self) -> None:
        """Copy every buffer before the step's first forward: a skipped step puts them back, for
        a forward on a bad batch has already moved them (one NaN image makes BatchNorm's running
        statistics NaN; AdaFace's norm statistics and CurricularFace's t would follow). Device
        copies, no host sync; buffers are a small fraction of the parameters."""
        buffers = self.step_tensors().buffers
        if self._buffer_snapshot is None or len(self._buffer_snapshot) != len(buffers):
            self._buffer_snapshot = [buffer.detach().clone() for buffer in buffers]
        elif buffers:
            torch._foreach_copy_(self._buffer_snapshot, buffers)
        self._snapshot_due = False

    @torch.no_grad()
    def _restore_buffers(self) -> None:
        buffers = self.step_tensors().buffers
        if buffers and self._buffer_snapshot is not None:
            torch._foreach_copy_(buffers, self._buffer_snapshot)

    def _check_weights_finite(self) -> None:
        """Stop (``NonFiniteError``) if a parameter or buffer is not finite: before a checkpoint
        is written. Every rank saves together, so the verdict is all-reduced (shards differ)."""
        named = [*self.named_parameters(), *self.named_buffers()]
        named = [(name, t) for name, t in named if t.is_floating_point() or t.is_complex()]
        if not named:
            return
        finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named])
        bad = [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]
        if all_reduce_sum(torch.tensor([len(bad)], device=finite.device)).item():
            shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "") or "on another rank"
            self._stopped = NonFiniteError(
                f"not saving a checkpoint at step {self.global_step}: the model's weights are not "
                f"finite ({shown}), training diverged; {RESUME_ADVICE}"
            )
            raise self._stopped

    def _check_labels(self, labels: torch.Tensor) -> None:
        """Once, on the first training batch: the labels must be integer class indices the
        classifier holds. A float label (DALI-style loaders yield them) would fail deep inside
        the loss, and one past the class count trains on a wrong or missing class. Reads the
        device once; under DDP every rank checks the global extremes, so all stop alike."""
        dtype = labels.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise DatasetError(
                f"training labels must be integer class indices, got {dtype} labels (the first "
                f"is {labels.flatten()[0].item()!r}): make the training loader yield integer "
                f"labels (a loader giving float labels, as DALI does, needs labels.long())"
            )
        # Without class centers only pair and triplet losses train (a center loss needs a head):
        # they compare labels, never index by them.
        if labels.numel() == 0 or self.classifier is None:
            return
        extremes = torch.stack([labels.min(), labels.max()]).long()
        if is_distributed():
            gathered = all_gather_rows(extremes.view(1, 2))
            extremes = torch.stack([gathered[:, 0].min(), gathered[:, 1].max()])
        low_outside, high_outside = self.classifier.labels_outside(extremes).tolist()
        if low_outside or high_outside:
            classes = self.classifier.num_classes
            raise DatasetError(
                f"training label {int(extremes[0] if low_outside else extremes[1])} is not a "
                f"class index in [0, {classes}): the classifier has {classes} classes (counted "
                f"in the training data); the training loader must give labels 0 to {classes - 1}"
            )

    def _check_clipping_sees_unscaled_gradients(self) -> None:
        """Under 16-mixed the GradScaler unscales the gradients before clipping, unless the
        optimizer unscales inside its own step (``fused=True``): clipping would then cut the
        scaled gradients (Lightning refuses it too)."""
        if self._loss_scaler() is None:
            return
        for optimizer in self.trainer.optimizers:
            if getattr(optimizer, "_step_supports_amp_scaling", False):
                # Also without clipping: a skipped step drops the gradients, and a fused step
                # then leaves the GradScaler without the inf check its update needs.
                raise TrainingError(
                    f"{type(optimizer).__name__}(fused=True) unscales inside its step under "
                    f"trainer.precision=16-mixed, where gradient clipping "
                    f"(trainer.gradient_clip_val) and skipping non-finite steps need unscaled "
                    f"gradients: set optimizer.fused=false"
                )

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        # What arcface_torch clips: the backbone's gradient (clip_grad_norm_(backbone, 5)), not
        # the class centers' or the margin's. One rule for every class-center store, and the
        # sharded-centers rule with it: the backbone is replicated and its gradient all-reduced,
        # so its norm is the same on every rank, while a norm over per-rank Partial-FC shards
        # would differ between ranks and make the replicas diverge. A skipped step has no
        # gradients left: nothing to clip.
        if not gradient_clip_val:
            return
        gradients = [p for p in self.step_tensors().backbone if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(gradients, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(gradients, gradient_clip_val)

    def _verification_datasets(self) -> list:
        loaders = self.trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        return [loader.dataset for loader in loaders]

    def _gather_embeddings(self, loader_idx: int, num_images: int) -> torch.Tensor:
        """All of a set's embeddings, placed by image index, gathered across DDP ranks.

        Each rank embedded its own share of the images (``ShardedSequentialSampler``: no
        padding, so counts differ by up to one). Every image must arrive exactly once: a
        repeated or missing one would change the pairs' scores without a sign."""
        batches = self._val_embeddings.get(loader_idx, [])
        if batches:
            indices, embeddings = map(torch.cat, zip(*batches, strict=True))
        else:  # a set smaller than the world leaves a rank without images
            indices = torch.empty(0, dtype=torch.long, device=self.device)
            embeddings = torch.empty(0, self.backbone.embedding_size, device=self.device)
        if self.trainer.world_size > 1:
            indices, embeddings = all_gather_uneven(indices), all_gather_uneven(embeddings)
        times = torch.bincount(indices, minlength=num_images)
        if times.numel() != num_images or not bool((times == 1).all()):
            name = self._verification_datasets()[loader_idx].name
            raise RuntimeError(
                f"validation embedded {int((times > 0).sum())} of the {num_images} images of "
                f"verification set {name!r}, some up to {int(times.max())} times: every "
                f"image must be embedded exactly once; keep trainer.limit_val_batches at 1.0 and "
                f"the val loaders' ShardedSequentialSampler"
            )
        placed = embeddings.new_zeros(num_images, embeddings.shape[1])
        placed[indices] = embeddings
        return placed

    def _parameter_groups(self) -> list[dict]:
        """Backbone; class centers (and bias) with the margin's and the loss terms' matrices;
        their scalars (a learnt scale or alpha must not be decayed towards zero). Empty groups
        are left out (a metric loss alone has no head parameters)."""
        parts = (self.classifier, self.head, self.losses)
        head = [p for part in parts if part is not None for p in part.parameters()]
        decay = self.weight_decay
        groups = [
            {"params": list(self.backbone.parameters()), "weight_decay": decay["backbone"]},
            {"params": [p for p in head if p.ndim > 0], "weight_decay": decay["head"]},
            {"params": [p for p in head if p.ndim == 0], "weight_decay": 0.0},
        ]
        return [group for group in groups if group["params"]]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self._parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(
            optimizer, total_steps=self.trainer.estimated_stepping_batches
        )
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
