"""Optimizers at the batch their paper states, and learning-rate schedules stepped every
optimizer step, built as ``f(optimizer, total_steps)``.

A paper's learning rate holds for its batch (SphereFace: 0.1 at 256). ``optimizer.lr`` given
with ``optimizer.reference_batch`` is that pair, and the run's rate is scaled to its own global
batch (``optimizer_for_batch``).

A schedule's length is fixed when the run starts and saved with its state: resuming with
settings that would change it (``trainer.max_epochs``, the batch size, the number of processes)
is refused, unless ``extend_on_resume`` stretches it deliberately — rebuilding a schedule over a
new total silently moves the learning rate at the resume step.
"""

import logging
import math
from collections.abc import Callable, Sequence

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from facetrain.checkpoint import CheckpointError

log = logging.getLogger(__name__)

# How the learning rate follows the batch: the rate at a global batch B is lr × rule(B / B_ref).
# linear: SGD (Goyal et al. 2017, "Accurate, Large Minibatch SGD": the update of k small steps
# equals one k-times larger step at k-times the rate). sqrt: Adam/AdamW (Malladi et al. 2022,
# "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms": the square-root rule keeps
# an adaptive method's trajectory). none: the rate as given, whatever the batch.
BATCH_SCALING = {"linear": lambda ratio: ratio, "sqrt": math.sqrt, "none": lambda ratio: 1.0}


class OptimizerConfigError(ValueError):
    """A learning-rate setting that cannot be used; printed as one line."""


def optimizer_for_batch(config: DictConfig, global_batch: int) -> tuple[Callable, float, str]:
    """The optimizer factory of ``config`` (an ``optimizer=`` group node, ``_partial_``) with its
    learning rate scaled to ``global_batch``, that rate, and the start-up line that says how.

    ``reference_batch`` (null: the rate as given) and ``batch_scaling`` (a key of
    ``BATCH_SCALING``) are facetrain's keys, not the optimizer's: they are taken out before the
    optimizer is built."""
    options = OmegaConf.to_container(config, resolve=True)
    reference = options.pop("reference_batch", None)
    rule = options.pop("batch_scaling", "none")
    if rule not in BATCH_SCALING:
        raise OptimizerConfigError(
            f"optimizer.batch_scaling={rule!r}: not a rule; use one of {', '.join(BATCH_SCALING)}"
        )
    if reference is not None and (
            not isinstance(reference, int) or isinstance(reference, bool) or reference < 1):
        raise OptimizerConfigError(
            f"optimizer.reference_batch={reference!r}: the global batch the learning rate is "
            f"stated for must be a positive whole number of images (e.g. 256), or null"
        )
    if reference is None or rule == "none":
        return instantiate(options), options["lr"], f"learning rate {options['lr']:g} at " \
            f"global batch " \
            f"{global_batch} (as given: optimizer.reference_batch={reference}, " \
            f"batch_scaling={rule})"
    base = options["lr"]
    options["lr"] = base * BATCH_SCALING[rule](global_batch / reference)
    return instantiate(options), options["lr"], (
        f"learning rate {options['lr']:.6g} = {base:g} at batch {reference} scaled to the global "
        f"batch {global_batch} ({rule} rule; optimizer.reference_batch={reference})"
    )


class FixedLengthSchedule(LambdaLR):
    """``LambdaLR`` over ``total_steps`` optimizer steps; ``total_steps`` is part of its state."""

    def __init__(self, optimizer: Optimizer, factor: Callable[[int], float], total_steps: int,
                 extend_on_resume: bool = False):
        self.total_steps = int(total_steps)
        self.extend_on_resume = extend_on_resume
        super().__init__(optimizer, factor)

    def load_state_dict(self, state_dict: dict) -> None:
        stored = state_dict.get("total_steps")  # absent in checkpoints of older facetrain
        if stored is not None and stored != self.total_steps:
            if not self.extend_on_resume:
                raise CheckpointError(
                    f"cannot resume: the learning-rate schedule of this run was fixed at {stored} "
                    f"optimizer steps when it started, and these settings give "
                    f"{self.total_steps} (trainer.max_epochs, data.batch_size and the number of "
                    f"processes set it); resume with the settings the run started with, or add "
                    f"scheduler.extend_on_resume=true to stretch the schedule to "
                    f"{self.total_steps} steps (the learning rate changes at the resume step)"
                )
            log.warning("learning-rate schedule stretched from %d to %d optimizer steps "
                        "(scheduler.extend_on_resume=true)", stored, self.total_steps)
        super().load_state_dict({**state_dict, "total_steps": self.total_steps,
                                 "extend_on_resume": self.extend_on_resume})


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def _warmup_then(decay: Callable[[float], float], warmup_steps: int,
                 total_steps: int) -> Callable[[int], float]:
    """The factor of a linear warm-up, then ``decay(progress)``, progress going 0 -> 1 over
    the steps after the warm-up."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        return decay(min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return factor


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    min_lr_ratio: float = 0.0,
    extend_on_resume: bool = False,
) -> FixedLengthSchedule:
    """Linear warm-up over ``warmup_fraction`` of training, then cosine decay to
    ``min_lr_ratio`` × the base learning rate."""
    warmup_steps = max(1, round(warmup_fraction * total_steps))

    def cosine(progress: float) -> float:
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    factor = _warmup_then(cosine, warmup_steps, total_steps)
    return FixedLengthSchedule(optimizer, factor, total_steps, extend_on_resume)


def warmup_multistep(
    optimizer: Optimizer,
    total_steps: int,
    milestones: Sequence[float] = (0.5, 0.75, 0.9),
    gamma: float = 0.1,
    warmup_fraction: float = 0.0,
    extend_on_resume: bool = False,
) -> FixedLengthSchedule:
    """Step decay by ``gamma`` at each milestone, given as a fraction of training (the schedule
    of the ArcFace and SphereFace papers), after an optional linear warm-up."""
    warmup_steps = max(1, round(warmup_fraction * total_steps))
    boundaries = [round(m * total_steps) for m in milestones]

    def factor(step: int) -> float:
        return _warmup(step, warmup_steps) * gamma ** sum(step >= b for b in boundaries)

    return FixedLengthSchedule(optimizer, factor, total_steps, extend_on_resume)


def warmup_poly(
    optimizer: Optimizer,
    total_steps: int,
    power: float = 1.0,
    warmup_fraction: float = 0.0,
    extend_on_resume: bool = False,
) -> FixedLengthSchedule:
    """Linear warm-up over ``warmup_fraction`` of training, then polynomial decay
    ``(1 - progress) ** power`` to 0: insightface arcface_torch's ``PolynomialLRWarmup``
    (``train_v2.py`` builds it with its default power 1, a linear decay; the older
    ``PolyScheduler`` used 2)."""
    warmup_steps = max(1, round(warmup_fraction * total_steps))
    factor = _warmup_then(lambda progress: (1 - progress) ** power, warmup_steps, total_steps)
    return FixedLengthSchedule(optimizer, factor, total_steps, extend_on_resume)
