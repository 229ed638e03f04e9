"""One training run from a composed ``train`` config: build data, backbone, head and trainer,
train, and report verification accuracy (also written to ``metrics.json`` in the run folder).
The command line (``python train.py [overrides]``) is ``facetrain.cli.train``.

A run resumes by itself when its folder already holds checkpoints (``facetrain.resume``), and
stops on a signal with a checkpoint saved (``facetrain.preemption``): ``metrics.json`` then says
``"status": "interrupted"`` (SIGTERM, Ctrl-C) or ``"requeued"`` (SLURM's USR1/USR2 warning).
"""

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, to_absolute_path
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig
from torch import nn

from facetrain.checkpoint import AtomicCheckpointIO, describe_model
from facetrain.data import LoadFailureReport
from facetrain.evaluation import evaluate_pairs
from facetrain.finetune import FineTuning
from facetrain.losses import EmbeddingLoss, LossError
from facetrain.module import FaceRecognitionModule
from facetrain.optim import optimizer_for_batch
from facetrain.preemption import Interrupted, Preemption
from facetrain.pretrained import load_backbone_weights
from facetrain.resume import CHECKPOINT_FOLDER, RandomState, resume_checkpoint

log = logging.getLogger(__name__)


def measure_baselines(
    model: FaceRecognitionModule, datamodule, trainer: pl.Trainer
) -> dict[str, dict[str, float]]:
    """Verification accuracy of raw pixels and of the untrained network (and its AUC), per set:
    what training has to beat. Every rank calls it: the untrained validation is collective, the
    raw pixels are read whole on each rank (no network, no collective: the same everywhere)."""
    raw_pixels = {
        loader.dataset.name: evaluate_pairs(nn.Flatten(), loader).accuracy
        for loader in datamodule.verification_loaders()
    }
    trainer.validate(model, datamodule=datamodule, verbose=False)
    results = model.verification_results.items()
    return {"raw_pixels": raw_pixels,
            "untrained": {name: r["accuracy"] for name, r in results},
            # on a few hundred pairs the AUC moves in finer steps than the accuracy
            "untrained_auc": {name: r["auc"] for name, r in results}}


def report(metrics: dict) -> str:
    lines = [f"{'verification set':<20}{'raw pixels':>12}{'untrained':>12}{'trained':>22}"]
    baselines = metrics.get("baselines", {})
    for name, result in metrics["verification"].items():
        raw = baselines.get("raw_pixels", {}).get(name, float("nan"))
        untrained = baselines.get("untrained", {}).get(name, float("nan"))
        trained = f"{result['accuracy']:.4f} ± {result['accuracy_std']:.4f}"
        lines.append(f"{name:<20}{raw:>12.4f}{untrained:>12.4f}{trained:>22}")
    return "\n".join(lines)


def _read_metrics(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# Lightning loggers whose package is an optional extra of facetrain (pyproject.toml).
LOGGER_EXTRAS = {"WandbLogger": "wandb", "MLFlowLogger": "mlflow"}


class LoggerError(ValueError):
    """A ``logger=`` choice that cannot be built, e.g. its package is not installed."""


def build_loggers(cfg: DictConfig) -> list:
    """The loggers of ``logger=``: one ``<name>: {_target_: ...}`` entry of ``cfg.logger`` per
    chosen file, several at once with ``logger=[tensorboard,csv]``, none with ``logger=none``.
    A file in the older one-logger form (``_target_`` at its top) is that one logger. Built as
    partials and then called, as the losses are, so that a missing optional package reaches the
    user as one line naming the extra to install, not inside Hydra's instantiation error."""
    chosen = cfg.get("logger") or {}
    specs = {"logger": chosen} if "_target_" in chosen else chosen
    loggers = []
    for name, spec in specs.items():
        if not isinstance(spec, Mapping) or "_target_" not in spec:
            raise LoggerError(f"logger.{name}: expected a logger, `{name}: {{_target_: ...}}` "
                              f"(as in configs/logger/csv.yaml), got {spec!r}")
        target = str(spec["_target_"])
        kind = target.rsplit(".", 1)[-1]
        if kind == "MLFlowLogger" and str(spec.get("tracking_uri") or "").startswith("file:"):
            # MLflow >= 3 refuses a file store unless asked to; a user's own setting wins.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            loggers.append(instantiate(spec, _partial_=True)())
        except ModuleNotFoundError as error:
            extra = LOGGER_EXTRAS.get(kind)
            if extra is None:
                raise LoggerError(f"logger.{name} ({target}): {error}") from None
            raise LoggerError(
                f"logger={name} ({target}) needs the {extra} package, which is not installed: "
                f'pip install -e ".[{extra}]" in a checkout (from a wheel: pip install '
                f'"facetrain[{extra}]"), or choose another logger (logger=[tensorboard,csv])'
            ) from None
    return loggers


def build_losses(cfg: DictConfig, embedding_size: int, datamodule, trainer: pl.Trainer):
    """``(head, classifier, losses)`` from ``loss=`` and ``auxiliary=``: a margin head on its
    class centers (``classifier=``), or a metric loss alone (head and classifier None), plus
    the weighted ``auxiliary`` terms. Built outside ``instantiate`` (a partial, then called), so
    that a setting that cannot work (``LossError``) reaches the user as one line, not wrapped in
    Hydra's instantiation error. Rank and world size come from the trainer: stores may shard."""
    loss = instantiate(cfg.loss, _partial_=True)()
    losses, head, classifier = {}, None, None
    choice = HydraConfig.get().runtime.choices.get("loss") or "metric"
    if isinstance(loss, EmbeddingLoss):
        losses[choice] = (1.0, loss)
    else:  # a margin: the class centers live in the classifier
        head = loss
        classifier = instantiate(cfg.classifier, _partial_=True)(
            embedding_size=embedding_size, num_classes=datamodule.num_classes, margin=head,
            rank=trainer.global_rank, world_size=trainer.world_size,
        )
    for name, spec in (cfg.get("auxiliary") or {}).items():
        spec = dict(spec)
        weight = spec.pop("weight", 1.0)
        term = instantiate(spec, _partial_=True)()
        if not isinstance(term, EmbeddingLoss):
            raise LossError(f"auxiliary.{name}: {spec.get('_target_')} is not a loss on embeddings "
                            f"(facetrain.losses); margin heads go in loss=")
        if name in losses:
            raise LossError(f"auxiliary.{name}: the name is taken by loss={choice}; give the "
                            f"extra term another name (+auxiliary.{name}_2=...) or drop one")
        losses[name] = (weight, term)
    if choice == "center" and "center" not in losses:  # auxiliary=[...] replaced its term
        raise LossError("loss=center is softmax + auxiliary=[center], and auxiliary=[...] "
                        "replaced that term: add terms with +auxiliary=[...] instead")
    for name, (_, term) in losses.items():
        term.bind(datamodule.num_classes, embedding_size)
        if term.needs_classification and head is None:
            raise LossError(f"{name} (a {type(term).__name__}) pulls embeddings to class centers "
                            f"and collapses without a classification loss beside it: use it with "
                            f"a margin head, e.g. loss=softmax auxiliary=[{name}]")
        if term.needs_identity_batches and datamodule.sampler is None:
            raise LossError(
                f"{name} (a {type(term).__name__}) is made of pairs of images of the same "
                f"identity inside a batch, and random batches hold almost none: add "
                f"data/sampler=identity_balanced (P identities x K images per batch)"
            )
    return head, classifier, losses


def train(cfg: DictConfig) -> dict:
    """Run one training job from a composed config; return the final metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    # Before anything is built: a checkpoint that holds pickled code is refused unread.
    ckpt_path = resume_checkpoint(cfg.ckpt_path, cfg.get("resume"), output_dir)

    backbone = instantiate(cfg.backbone)  # a bad model config fails before data is touched
    fine_tuning = FineTuning.from_config(cfg)  # model.freeze_*, backbone_lr_scale: checked now
    model_options = fine_tuning.module_options(cfg)
    loggers = build_loggers(cfg)  # a logger whose package is missing: before data too
    init_from = model_options.pop("init_from", None)
    if init_from and ckpt_path is None:  # a resumed run has its own weights
        log.info(load_backbone_weights(backbone, to_absolute_path(str(init_from))))
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if not datamodule.verification_sets:
        log.warning("no verification sets configured (data.verification): keeping only last.ckpt")
        cfg.callbacks.checkpoint.monitor = None
    callbacks = [  # the learning-rate monitor writes to a logger and refuses to run without one
        instantiate(c) for name, c in cfg.callbacks.items()
        if c is not None and (loggers or name != "learning_rate")  # null: a recipe drops it
    ]
    callbacks.append(LoadFailureReport())  # images that failed to decode, once per epoch
    preemption = Preemption(output_dir / CHECKPOINT_FOLDER)
    callbacks += [RandomState(), preemption, *fine_tuning.callbacks()]
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # facetrain.preemption requeues; Lightning's own must not too
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks, plugins=plugins)
    head, classifier, losses = build_losses(cfg, backbone.embedding_size, datamodule, trainer)
    # data.batch_size is per process: the optimizer sees the batch of every process and step
    global_batch = datamodule.batch_size * trainer.world_size * trainer.accumulate_grad_batches
    optimizer, learning_rate, how = optimizer_for_batch(cfg.optimizer, global_batch)
    log.info(how)
    model = FaceRecognitionModule(
        backbone,
        head,
        classifier,
        optimizer=fine_tuning.optimizer(optimizer, backbone),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        description=describe_model(cfg, backbone.embedding_size, datamodule.num_classes),
        losses=losses,
        **model_options,
    )

    metrics: dict = {"status": "finished", "learning_rate": learning_rate,
                     "global_batch": global_batch}
    previous = _read_metrics(output_dir / "metrics.json")  # of this run folder, if resumed
    start_step = None
    if ckpt_path is not None:
        metrics["resumed_from"] = str(ckpt_path)
        if "baselines" in previous:  # measured when the run started
            metrics["baselines"] = previous["baselines"]
        start_step = torch.load(ckpt_path, map_location="cpu", weights_only=True,
                                mmap=True)["global_step"]
    elif cfg.measure_baselines and datamodule.verification_sets:
        metrics["baselines"] = measure_baselines(model, datamodule, trainer)
    # weights_only: a resumed checkpoint holds tensors and plain containers only (never pickled
    # objects that could run code); the module's on_load_checkpoint checks it fits this model.
    interrupted = None
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except Interrupted as stop:
        interrupted = stop
        metrics.update(status="requeued" if stop.requeue else "interrupted",
                       signal=stop.signal_name, checkpoint=str(stop.checkpoint))
        if stop.requeue:
            metrics["requeue"] = preemption.requeue_method(stop)

    if interrupted is None and trainer.global_step == start_step and previous:
        log.info("this run had already finished at step %d: nothing to train; metrics.json "
                 "kept", start_step)
        return previous
    checkpoint = trainer.checkpoint_callback
    metrics.update(
        verification=model.verification_results,
        best={
            "val/accuracy": float(checkpoint.best_model_score)
            if checkpoint and checkpoint.best_model_score is not None else None,
            "checkpoint": checkpoint.best_model_path if checkpoint else None,
        },
        epochs=trainer.current_epoch,
        steps=trainer.global_step,
        num_classes=datamodule.num_classes,
        num_train_images=len(datamodule.train_set),
        load_failures=datamodule.load_failures(),  # counted in every DataLoader worker
        nonfinite_skipped_steps=model.nonfinite_skipped,  # the same on every rank (all-reduced)
        amp_overflow_steps=model.amp_overflow_steps,
    )
    if trainer.is_global_zero:  # one file, one report (verification is the same on every rank)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if interrupted is None:
            log.info("final verification accuracy (10-fold):\n%s", report(metrics))
        log.info("run folder: %s", output_dir)
    if interrupted is not None and interrupted.requeue:
        log.info("%s: requeue: %s", interrupted.signal_name, metrics["requeue"])
        preemption.requeue(interrupted, trainer.is_global_zero)
    elif interrupted is not None:
        log.warning("interrupted by %s at step %d; checkpoint %s. Run the same command again "
                    "(or resume=%s) to continue", interrupted.signal_name, interrupted.step,
                    interrupted.checkpoint, output_dir)
    return metrics
