"""Learning-rate schedules stepped every optimizer step, built as ``f(optimizer, total_steps)``."""

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.05, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of training, then cosine decay to
    ``min_lr_ratio`` × the base learning rate."""
    warmup_steps = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def warmup_multistep(
    optimizer: Optimizer,
    total_steps: int,
    milestones: Sequence[float] = (0.5, 0.75, 0.9),
    gamma: float = 0.1,
    warmup_fraction: float = 0.0,
) -> LambdaLR:
    """Step decay by ``gamma`` at each milestone, given as a fraction of training (the schedule
    of the ArcFace and SphereFace papers), after an optional linear warm-up."""
    warmup_steps = max(1, round(warmup_fraction * total_steps))
    boundaries = [round(m * total_steps) for m in milestones]

    def factor(step: int) -> float:
        return _warmup(step, warmup_steps) * gamma ** sum(step >= b for b in boundaries)

    return LambdaLR(optimizer, factor)
