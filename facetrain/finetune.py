"""Fine-tuning a backbone trained elsewhere (``model.init_from``) on a few new identities.

- ``model.freeze_backbone_epochs=N``: for the first N epochs the backbone does not train at all
  — eval mode (BatchNorm statistics and dropout as pretrained) and no update — while the new
  head, class centers of identities the backbone never saw and random at the start, settles on
  its embeddings. Without it the random centers' first, large gradients reach the pretrained
  features (the loss that rises at the start of fine-tuning, insightface #1455).
- ``model.backbone_lr_scale=s``: the backbone's parameter group learns at s × the learning rate,
  the head at the full rate. The schedules (``facetrain.optim``, LambdaLR) scale each group's own
  base rate, so the ratio holds at every step, warm-up and decay included.
- ``model.freeze_batchnorm=true``: the backbone's BatchNorm layers stay in eval mode for the
  whole run: their running statistics stay those of the pretraining (a batch of a few new
  identities estimates them poorly); their affine weights still train.

How the freeze is done, and why so: the backbone's gradients are dropped (set to None) just
before each optimizer step of a frozen epoch, after the backward and DDP's all-reduce. The
optimizer then skips those parameters (no update, no weight decay, no Adam moment or step count
change), exactly as it skips a non-finite step (``FaceRecognitionModule``). The alternatives
break something: ``requires_grad=False`` for some epochs changes which parameters DDP expects
gradients for after it wrapped the model (its reducer fails, unless
``find_unused_parameters=True`` pays a graph traversal every step of the run); a learning rate
of 0 is overwritten by the schedule every step, and AdamW would still move its moments;
Lightning's ``BackboneFinetuning`` adds the backbone to the optimizer mid-run, so the optimizer
of a run resumed inside the freeze is not the one that was saved. Here nothing is stored: the
decision reads the epoch counter, which the checkpoint restores, so a resume in the middle of a
frozen epoch continues frozen and an uninterrupted and a resumed run match. The price: the
frozen epochs still compute the backbone's backward (as an ordinary epoch costs).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import Callback, LightningModule, Trainer
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from facetrain.module import TrainingError

log = logging.getLogger(__name__)

KEYS = ("freeze_backbone_epochs", "backbone_lr_scale", "freeze_batchnorm")  # of cfg.model


def _required(key: str, what: str = "...") -> None:
    """``${facetrain.required:KEY,WHAT}``: a value a recipe needs from the user (``add
    KEY=WHAT``). OmegaConf's own ``???`` cannot say it: merged onto a value (train.yaml's
    ``init_from: null``) it is dropped. Resolved only when read, so a value given on the command
    line replaces it before anything asks."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    recipe = choices.get("experiment")
    why = f" (experiment={recipe} needs it)" if recipe else ""
    raise TrainingError(f"{key} must be given{why}: add {key}={what}")


OmegaConf.register_new_resolver("facetrain.required", _required, replace=True)


class BackboneFreeze(Callback):
    """Freezes ``pl_module.backbone`` for the first ``epochs`` epochs (eval mode, gradients
    dropped before each optimizer step) and, with ``batchnorm``, keeps its BatchNorm layers in
    eval mode for the whole run. Stateless: it reads ``trainer.current_epoch``."""

    def __init__(self, epochs: int = 0, batchnorm: bool = False):
        self.epochs, self.batchnorm = int(epochs), bool(batchnorm)

    def frozen(self, trainer: Trainer) -> bool:
        return trainer.current_epoch < self.epochs

    def _set_modes(self, trainer: Trainer, backbone: nn.Module) -> None:
        # Lightning leaves modes as they are between epochs (its validation loop restores
        # whatever it found), so each epoch sets them: at the epoch's start, and at the start
        # of training, for a run resumed mid-epoch gets no epoch start.
        if self.frozen(trainer):
            backbone.eval()
            return
        if self.epochs:
            backbone.train()
        if self.batchnorm:
            for module in backbone.modules():
                if isinstance(module, _BatchNorm):  # SyncBatchNorm too (trainer.sync_batchnorm)
                    module.eval()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._set_modes(trainer, pl_module.backbone)
        if self.frozen(trainer) and trainer.is_global_zero:
            log.info("backbone frozen until epoch %d (model.freeze_backbone_epochs=%d): the head "
                     "trains alone", self.epochs, self.epochs)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._set_modes(trainer, pl_module.backbone)
        if self.epochs and trainer.current_epoch == self.epochs and trainer.is_global_zero:
            log.info("epoch %d: the backbone trains from now on%s", self.epochs,
                     " (BatchNorm statistics kept)" if self.batchnorm else "")

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule,
                                 optimizer) -> None:
        if self.frozen(trainer):
            for parameter in pl_module.backbone.parameters():
                parameter.grad = None


class ScaledBackboneLR:
    """An optimizer factory (parameter groups → optimizer, as ``FaceRecognitionModule`` takes)
    that builds with ``factory`` and multiplies the learning rate of the groups made of
    ``backbone``'s parameters by ``scale``. Called before the schedule is built, which then
    takes the scaled rate as that group's base rate; a resumed run gets it from the checkpoint."""

    def __init__(self, factory: Callable, backbone: nn.Module, scale: float):
        self.factory, self.backbone, self.scale = factory, backbone, float(scale)

    def __call__(self, groups):
        optimizer = self.factory(groups)
        mine = {id(parameter) for parameter in self.backbone.parameters()}
        scaled = [group for group in optimizer.param_groups
                  if group["params"] and all(id(p) in mine for p in group["params"])]
        if not scaled:
            raise TrainingError("model.backbone_lr_scale: no parameter group of the optimizer is "
                                "the backbone's alone, so its learning rate cannot be scaled")
        for group in scaled:
            group["lr"] = group["lr"] * self.scale
        return optimizer


@dataclass(frozen=True)
class FineTuning:
    """The fine-tuning settings of ``cfg.model``, checked before any data is read."""

    freeze_backbone_epochs: int = 0
    backbone_lr_scale: float = 1.0
    freeze_batchnorm: bool = False

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "FineTuning":
        model = cfg.model
        init_from = model.get("init_from")  # a recipe may require it (_required)
        epochs = model.get("freeze_backbone_epochs", 0)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise TrainingError(f"model.freeze_backbone_epochs must be a whole number of epochs "
                                f">= 0, got {epochs!r}")
        max_epochs = cfg.trainer.get("max_epochs")
        if epochs and isinstance(max_epochs, int) and 0 < max_epochs <= epochs:
            raise TrainingError(
                f"model.freeze_backbone_epochs={epochs} freezes the backbone for all "
                f"trainer.max_epochs={max_epochs} epochs, and verification uses the backbone "
                f"only: make it smaller than trainer.max_epochs"
            )
        scale = model.get("backbone_lr_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise TrainingError(f"model.backbone_lr_scale must be a number > 0 (e.g. 0.1), got "
                                f"{scale!r}; to keep the backbone fixed for some epochs use "
                                f"model.freeze_backbone_epochs")
        batchnorm = model.get("freeze_batchnorm", False)
        if not isinstance(batchnorm, bool):
            raise TrainingError(f"model.freeze_batchnorm must be true or false, got {batchnorm!r}")
        if epochs and not init_from:
            log.warning("model.freeze_backbone_epochs=%d without model.init_from: the frozen "
                        "backbone is the random initial one", epochs)
        return cls(epochs, float(scale), batchnorm)

    @staticmethod
    def module_options(cfg: DictConfig) -> dict:
        """``cfg.model`` without the keys read here: what the module and init_from take."""
        return {key: value for key, value in cfg.model.items() if key not in KEYS}

    def callbacks(self) -> list[Callback]:
        if self.freeze_backbone_epochs or self.freeze_batchnorm:
            return [BackboneFreeze(self.freeze_backbone_epochs, self.freeze_batchnorm)]
        return []

    def optimizer(self, factory: Callable, backbone: nn.Module) -> Callable:
        if self.backbone_lr_scale == 1.0:
            return factory
        return ScaledBackboneLR(factory, backbone, self.backbone_lr_scale)

