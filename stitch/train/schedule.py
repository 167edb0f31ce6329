"""Learning-rate schedule: linear warmup, then cosine or linear decay to a floor (Megatron's shape).

The schedule is a pure function of the step, expressed as a factor of each parameter group's peak rate, so
one schedule drives groups with different rates (a rate per part) and the floor keeps the same ratio to the
peak in every group. It plugs into `torch.optim.lr_scheduler.LambdaLR`, whose state is a few numbers that
resume restores exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LRSchedule", "build_scheduler"]


@dataclass(frozen=True)
class LRSchedule:
    """factor(step) in [min_ratio, 1]: the multiple of the peak rate used for optimizer step `step` (0-based).

    Warmup: (step + 1) / warmup_steps, so the first step already moves (Megatron's convention);
    decay: from 1 at `warmup_steps` to `min_ratio` at `decay_steps`, flat afterwards.
    """

    kind: str = "cosine"
    warmup_steps: int = 0
    decay_steps: int = 1
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if step >= self.decay_steps:
            return self.min_ratio
        span = max(1, self.decay_steps - self.warmup_steps)
        progress = (step - self.warmup_steps) / span
        if self.kind == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str,
    warmup_steps: int,
    decay_steps: int,
    peak_lr: float,
    min_lr: float,
) -> LambdaLR:
    """A LambdaLR over `optimizer` (whose groups hold their peak rates) following `LRSchedule`."""
    schedule = LRSchedule(kind, warmup_steps, decay_steps, min_lr / peak_lr if peak_lr else 0.0)
    return LambdaLR(optimizer, schedule)
