"""Per-step schedules as pure functions of the optimizer step (dinov2's `CosineScheduler`): the only
schedule state a checkpoint needs is the step itself (DESIGN §4.7)."""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(step: int, start: float, end: float, total_steps: int, warmup_steps: int = 0,
           warmup_start: float = 0.0) -> float:
    """Linear warmup from `warmup_start` to `start` over `warmup_steps`, then a half cosine from
    `start` to `end` reaching `end` at `total_steps`; `end` afterwards. `step` counts from 0."""
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0 or step >= total_steps:
        return end
    progress = (step - warmup_steps) / decay_steps
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class StepValues:
    """Everything the optimizer and the EMA need at one step."""
    lr: float
    weight_decay: float
    momentum: float
    freeze_last_layer: bool


@dataclass(frozen=True)
class Schedules:
    """lr (warmup + cosine to `min_lr`), weight decay (cosine 0.04 -> 0.4), teacher momentum
    (cosine 0.996 -> 1) and the last-layer freeze. `peak_lr` is already linearly scaled."""
    total_steps: int
    peak_lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    weight_decay_end: float
    momentum_start: float
    momentum_end: float
    freeze_last_layer_steps: int

    def __post_init__(self):
        if self.min_lr >= self.peak_lr:
            raise ValueError(f"min_lr {self.min_lr:g} must be below the peak lr {self.peak_lr:g}")

    def at(self, step: int) -> StepValues:
        return StepValues(
            lr=cosine(step, self.peak_lr, self.min_lr, self.total_steps, self.warmup_steps),
            weight_decay=cosine(step, self.weight_decay, self.weight_decay_end, self.total_steps),
            momentum=cosine(step, self.momentum_start, self.momentum_end, self.total_steps),
            freeze_last_layer=step < self.freeze_last_layer_steps,
        )
