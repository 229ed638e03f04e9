"""The LightningModule: backbone → embedding → head → cross-entropy. Wiring, optimisation and
logging only; the model math lives in ``backbones/`` and ``heads/``."""

import logging
from collections.abc import Callable, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from facetrain.checkpoint import METADATA_KEY, check_resume
from facetrain.evaluation import embed, kfold_verification, pair_scores, roc_curve
from facetrain.evaluation.plots import plot_roc
from facetrain.evaluation.projector import projector_sample

log = logging.getLogger(__name__)


class FaceRecognitionModule(pl.LightningModule):
    """Trains ``backbone`` + ``head`` with cross-entropy; validates on verification pairs.

    ``optimizer`` is a factory taking parameter groups (a Hydra ``_partial_``);
    ``scheduler`` takes the optimizer and the total number of optimizer steps.
    ``weight_decay`` gives each parameter group its own decay: ``{"backbone": .., "head": ..}``.
    ``description`` (plain containers: configs, input size, normalisation; see
    ``facetrain.checkpoint.describe_model``) is stored in every checkpoint so that the model can
    be rebuilt and checked without the training config. With a TensorBoard logger, validation
    also draws each set's ROC curve and, every ``projector_every_n_epochs``, puts
    ``projector_samples`` held-out embeddings with identity labels and thumbnails in the
    embedding projector (0 = off).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        optimizer: Callable,
        scheduler: Callable | None = None,
        weight_decay: Mapping[str, float] | None = None,
        flip_test: bool = True,
        histogram_every_n_steps: int = 100,
        channels_last: bool = False,
        description: Mapping | None = None,
        roc_figure: bool = True,
        projector_samples: int = 256,
        projector_every_n_epochs: int = 5,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.weight_decay = dict(weight_decay or {"backbone": 5e-4, "head": 5e-4})
        self.flip_test = flip_test
        self.histogram_every_n_steps = histogram_every_n_steps
        self.channels_last = channels_last
        if channels_last:  # NHWC convolutions: ~1.6x faster MobileFaceNet steps on CPU (oneDNN)
            self.backbone.to(memory_format=torch.channels_last)
        self.description = dict(description) if description is not None else None
        self.roc_figure = roc_figure
        self.projector_samples = projector_samples
        self.projector_every_n_epochs = projector_every_n_epochs
        self._projector_samples: dict[str, tuple] = {}  # per set: read its thumbnails once
        self.verification_results: dict[str, dict[str, float]] = {}
        self._val_embeddings: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def _memory_format(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        embeddings = self.backbone(self._memory_format(images))
        loss = F.cross_entropy(self.head(embeddings, labels), labels)
        extra = self.head.extra_loss()
        if extra is not None:
            self.log("train/head_extra_loss", extra)
            loss = loss + extra
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step} (epoch "
                f"{self.current_epoch}); lower optimizer.lr or add warm-up, then resume from the "
                f"last good checkpoint in the run's checkpoints/ folder with ckpt_path=..."
            )
        self.log("train/loss", loss, prog_bar=True)
        for name, value in self.head.state_metrics().items():  # lambda, t, learnt scale, ...
            self.log(f"train/head_{name}", value)
        self._log_head_statistics(embeddings.detach(), labels)
        return loss

    def _log_head_statistics(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Head statistics on logging steps only: they cost an extra class-matrix product."""
        # Lightning writes logged values on the steps where (step + 1) % log_every_n_steps == 0.
        step = self.global_step + 1
        scalars = step % self.trainer.log_every_n_steps == 0
        histograms = step % self.histogram_every_n_steps == 0 and isinstance(
            self.logger, TensorBoardLogger
        )
        if not (scalars or histograms):
            return
        stats = self.head.statistics(embeddings, labels)
        if scalars:
            self.log("train/accuracy", stats["accuracy"], prog_bar=True)
            self.log("train/theta_y_deg", stats["theta_y"].mean())
            self.log("train/theta_max_negative_deg", stats["theta_max_negative"].mean())
            self.log("train/cos_max_negative", stats["cos_max_negative"])
            self.log("train/hard_negative_fraction", stats["hard_negative_fraction"])
        if histograms:
            writer = self.logger.experiment
            for name in ("theta_y", "theta_max_negative"):
                writer.add_histogram(f"train/{name}_deg", stats[name], self.global_step)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, indices = batch
        embeddings = embed(self.backbone, self._memory_format(images), self.flip_test)
        self._val_embeddings.setdefault(dataloader_idx, []).append((indices, embeddings))

    def on_validation_epoch_start(self) -> None:
        self._val_embeddings.clear()

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
                self.log(f"val/{dataset.name}/{key}", value, add_dataloader_idx=False)
            self._log_to_tensorboard(dataset, embeddings, scores)
            accuracies.append(result.accuracy)
            log.info(
                "epoch %d, %s: verification accuracy %.4f ± %.4f, AUC %.4f",
                self.current_epoch, dataset.name, result.accuracy, result.accuracy_std, result.auc,
            )
        self.log("val/accuracy", float(np.mean(accuracies)), prog_bar=True)
        self._val_embeddings.clear()

    def _log_to_tensorboard(self, dataset, embeddings: torch.Tensor, scores: np.ndarray) -> None:
        """ROC figure and embedding projector of one verification set (rank 0 only)."""
        writer = next(
            (lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None
        )
        if writer is None or not self.trainer.is_global_zero:
            return
        if self.roc_figure:
            far, tar, _ = roc_curve(scores, dataset.same)
            figure = plot_roc({dataset.name: (far, tar)}, f"{dataset.name}, epoch "
                                f"{self.current_epoch}")
            writer.add_figure(f"val/{dataset.name}/roc", figure, self.global_step)
        epoch = self.current_epoch + 1
        last_epoch = self.trainer.max_epochs is not None and epoch >= self.trainer.max_epochs
        if self.projector_samples > 0 and (epoch % self.projector_every_n_epochs == 0
                                           or last_epoch):
            if dataset.name not in self._projector_samples:
                self._projector_samples[dataset.name] = projector_sample(
                    dataset, self.projector_samples
                )
            indices, labels, thumbnails = self._projector_samples[dataset.name]
            writer.add_embedding(
                embeddings[torch.as_tensor(indices, device=embeddings.device)].float().cpu(),
                metadata=labels, label_img=thumbnails, global_step=self.global_step,
                tag=dataset.name,
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.description is not None:
            checkpoint[METADATA_KEY] = self.description

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.description is not None:
            check_resume(checkpoint, self.description, self)

    def _verification_datasets(self) -> list:
        loaders = self.trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        return [loader.dataset for loader in loaders]

    def _gather_embeddings(self, loader_idx: int, num_images: int) -> torch.Tensor:
        """All of a set's embeddings, placed by image index (gathered across DDP ranks)."""
        indices, embeddings = map(torch.cat, zip(*self._val_embeddings[loader_idx], strict=True))
        indices, embeddings = self.all_gather(indices), self.all_gather(embeddings)
        indices, embeddings = indices.reshape(-1), embeddings.reshape(-1, embeddings.shape[-1])
        placed = embeddings.new_zeros(num_images, embeddings.shape[1])
        placed[indices] = embeddings
        return placed

    def configure_optimizers(self):
        head_scalars = [p for p in self.head.parameters() if p.ndim == 0]
        head_matrices = [p for p in self.head.parameters() if p.ndim > 0]
        decay = self.weight_decay
        groups = [
            {"params": list(self.backbone.parameters()), "weight_decay": decay["backbone"]},
            {"params": head_matrices, "weight_decay": decay["head"]},
        ]
        if head_scalars:  # a learnt scale or alpha must not be decayed towards zero
            groups.append({"params": head_scalars, "weight_decay": 0.0})
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(
            optimizer, total_steps=self.trainer.estimated_stepping_batches
        )
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
