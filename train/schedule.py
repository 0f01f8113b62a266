"""A run in steps: how many there are, and the learning rate at each (a pure function of the step, so a resumed
run follows the same schedule)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vqtool.model.config import TrainConfig
    from vqtool.train.data.memory import TrainingData


def lr_factor(schedule: str, step: int, total: int, warmup: int, cooldown: int = 0) -> float:
    """Multiplier of the base learning rate at (0-based) `step` of `total`: a pure function of the step, so a
    resumed run follows the same schedule. A constant rate may end in a linear cool-down to 0 over the last
    `cooldown` steps (warmup-stable-decay, Hägele et al. 2024)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return min(1.0, (total - step) / cooldown) if cooldown else 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(config: TrainConfig, data: TrainingData) -> int:
    """Steps between validations: the run's own setting, else one pass over the data."""
    return config.steps_per_epoch or data.steps_per_epoch(config.batch_size)


def total_steps(config: TrainConfig, data: TrainingData) -> int:
    """The step a run ends at: `steps` when given, else `epochs` epochs."""
    return config.steps if config.steps is not None else config.epochs * steps_per_epoch(config, data)
