"""Learning-rate schedules stepped every optimizer step, built as ``f(optimizer, total_steps)``.

A schedule's length is fixed when the run starts and saved with its state: resuming with
settings that would change it (``trainer.max_epochs``, the batch size, the number of processes)
is refused, unless ``extend_on_resume`` stretches it deliberately — rebuilding a schedule over a
new total silently moves the learning rate at the resume step.
"""

import logging
import math
from collections.abc import Callable, Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from facetrain.checkpoint import CheckpointError

log = logging.getLogger(__name__)


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

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

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
