"""The LightningModule: backbone → embedding → class centers + margin → cross-entropy. Wiring,
optimisation and logging only; the model math lives in ``backbones/``, ``classifiers/`` and
``heads/``."""

import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from facetrain.checkpoint import METADATA_KEY, check_resume, upgrade_state_dict
from facetrain.classifiers import ClassCenters
from facetrain.classifiers.distributed import all_gather_rows
from facetrain.evaluation import embed, kfold_verification, pair_scores

log = logging.getLogger(__name__)


class ValidatedSet(NamedTuple):
    """One verification set at the end of a validation epoch, for callbacks to show."""

    dataset: Any  # name, pairs, same, identities; yields (image, image index)
    embeddings: torch.Tensor  # (images, D), placed by image index, gathered across ranks
    scores: np.ndarray  # cosine score of each pair


class FaceRecognitionModule(pl.LightningModule):
    """Trains ``backbone`` + ``head`` (a margin, ``facetrain.heads``) on the class centers of
    ``classifier`` (``facetrain.classifiers``) with cross-entropy; validates on verification
    pairs.

    ``optimizer`` is a factory taking parameter groups (a Hydra ``_partial_``);
    ``scheduler`` takes the optimizer and the total number of optimizer steps.
    ``weight_decay`` gives each parameter group its own decay: ``{"backbone": .., "head": ..}``.
    ``description`` (plain containers: configs, input size, normalisation; see
    ``facetrain.checkpoint.describe_model``) is stored in every checkpoint so that the model can
    be rebuilt and checked without the training config. What is shown (ROC figures, projector,
    histograms) is drawn by ``facetrain.callbacks`` from ``last_validation`` and
    ``head_statistics``; ``training_step`` returns the batch's embeddings beside the loss.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        classifier: ClassCenters,
        optimizer: Callable,
        scheduler: Callable | None = None,
        weight_decay: Mapping[str, float] | None = None,
        flip_test: bool = True,
        channels_last: bool = False,
        description: Mapping | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.classifier = classifier
        if classifier.sharded:  # each rank's shard has its own gradient: DDP must not average it
            self._ddp_params_and_buffers_to_ignore = [
                f"classifier.{name}" for name, _ in classifier.named_parameters()
            ]
        self._first_non_finite: torch.Tensor | None = None  # step of the first bad loss, or -1
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.weight_decay = dict(weight_decay or {"backbone": 5e-4, "head": 5e-4})
        self.flip_test = flip_test
        self.channels_last = channels_last
        if channels_last:  # NHWC convolutions: ~1.6x faster MobileFaceNet steps on CPU (oneDNN)
            self.backbone.to(memory_format=torch.channels_last)
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

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.head.set_step(self.global_step)  # annealing counts optimizer steps, not forwards

    def _is_logging_step(self) -> bool:
        # Lightning writes logged values on the steps where (step + 1) % log_every_n_steps == 0.
        return (self.global_step + 1) % self.trainer.log_every_n_steps == 0

    def training_step(self, batch, batch_idx: int) -> dict:
        images, labels = batch
        embeddings = self.backbone(self._memory_format(images))
        logging = self._is_logging_step()
        output = self.classifier(embeddings, labels, self.head, statistics=logging)
        loss = output.loss
        extra = self.head.extra_loss()
        if extra is not None:
            self.log("train/head_extra_loss", extra)
            loss = loss + extra
        self._check_finite(loss, logging)
        self.log("train/loss", loss, prog_bar=True)
        for name, value in self.head.state_metrics().items():  # lambda, t, learnt scale, ...
            self.log(f"train/head_{name}", value)
        if output.statistics is not None:
            self._log_head_statistics(output.statistics)
        # embeddings and statistics for the callbacks' batch-end hooks (histograms)
        return {"loss": loss, "embeddings": embeddings.detach(), "statistics": output.statistics}

    def _check_finite(self, loss: torch.Tensor, logging: bool) -> None:
        """Remember the first step whose loss is not finite without reading the device (no
        host sync); stop on the next logging step, naming that step."""
        bad = ~torch.isfinite(loss.detach())
        if self._first_non_finite is None:
            self._first_non_finite = torch.full((), -1, dtype=torch.long, device=loss.device)
        first = self._first_non_finite
        self._first_non_finite = torch.where(bad & (first < 0), self.global_step, first)
        if logging:
            self._stop_if_non_finite()

    def _stop_if_non_finite(self) -> None:
        """Raise if a training loss so far was not finite (reads the device)."""
        if self._first_non_finite is not None and self._first_non_finite >= 0:
            raise FloatingPointError(
                f"training loss is not finite (nan or inf) since step "
                f"{int(self._first_non_finite)} (epoch {self.current_epoch}); lower optimizer.lr "
                f"or add warm-up, then resume from the last good checkpoint in the run's "
                f"checkpoints/ folder with ckpt_path=..."
            )

    @torch.no_grad()
    def head_statistics(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict:
        """The head's view of a batch: per-sample ``theta_y`` and ``theta_max_negative`` in
        degrees, and batch scalars (``ClassCenters.statistics``)."""
        return self.classifier.statistics(embeddings, labels, self.head)

    def _log_head_statistics(self, stats: dict) -> None:
        self.log("train/accuracy", stats["accuracy"], prog_bar=True)
        self.log("train/theta_y_deg", stats["theta_y"].mean())
        self.log("train/theta_max_negative_deg", stats["theta_max_negative"].mean())
        self.log("train/cos_max_negative", stats["cos_max_negative"])
        self.log("train/hard_negative_fraction", stats["hard_negative_fraction"])

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
        # Weights made after a non-finite loss are not worth a file: stop before it is written,
        # so last.ckpt stays the last good one (the next logging step may be epochs away).
        self._stop_if_non_finite()
        if self.description is not None:
            checkpoint[METADATA_KEY] = self.description
        if self.classifier.sharded:  # the centers' optimizer state, whole (see PartialFC)
            self._convert_center_state(checkpoint, self.classifier.full_rows, rows=None)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        upgrade_state_dict(checkpoint["state_dict"])
        if self.classifier.sharded:
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

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        if not self.classifier.sharded or gradient_clip_val is None:
            return super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
        # Clip the replicated parameters only: a norm taken over per-rank shards would differ
        # between ranks and make the replicas diverge.
        replicated = [p for name, p in self.named_parameters()
                      if not name.startswith("classifier.") and p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(replicated, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(replicated, gradient_clip_val)

    def _verification_datasets(self) -> list:
        loaders = self.trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        return [loader.dataset for loader in loaders]

    def _gather_embeddings(self, loader_idx: int, num_images: int) -> torch.Tensor:
        """All of a set's embeddings, placed by image index, gathered across DDP ranks.

        Each rank embedded its own share of the images (``ShardedSequentialSampler``: no
        padding, so counts differ by up to one); an all-gather needs equal shapes, so every rank
        pads to the largest count with image index -1 and the padding is dropped after. Every
        image must arrive exactly once: a repeated or missing one would change the pairs'
        scores without a sign."""
        batches = self._val_embeddings.get(loader_idx, [])
        if batches:
            indices, embeddings = map(torch.cat, zip(*batches, strict=True))
        else:  # a set smaller than the world leaves a rank without images
            indices = torch.empty(0, dtype=torch.long, device=self.device)
            embeddings = torch.empty(0, self.classifier.embedding_size, device=self.device)
        if self.trainer.world_size > 1:
            counts = all_gather_rows(torch.tensor([indices.numel()], device=self.device))
            padding = int(counts.max()) - indices.numel()
            indices = all_gather_rows(nn.functional.pad(indices, (0, padding), value=-1))
            embeddings = all_gather_rows(nn.functional.pad(embeddings, (0, 0, 0, padding)))
            embeddings, indices = embeddings[indices >= 0], indices[indices >= 0]
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
        """Backbone; class centers (and bias) with the margin's matrices; the margin's scalars
        (a learnt scale or alpha must not be decayed towards zero)."""
        head = [*self.classifier.parameters(), *self.head.parameters()]
        decay = self.weight_decay
        groups = [
            {"params": list(self.backbone.parameters()), "weight_decay": decay["backbone"]},
            {"params": [p for p in head if p.ndim > 0], "weight_decay": decay["head"]},
        ]
        scalars = [p for p in head if p.ndim == 0]
        if scalars:
            groups.append({"params": scalars, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self._parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(
            optimizer, total_steps=self.trainer.estimated_stepping_batches
        )
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
