"""Learning-rate schedules that keep every group's ratio to the others.

The schedule is one factor ``f(step)`` applied to *every* group's base lr (a ``LambdaLR`` with a
single function), so ``head lr / backbone lr`` is the same at every step, and a cosine floor
(``min_lr_ratio``) is a fraction of each group's own base lr, not one absolute value.

It is stepped once per optimizer step (per batch), so warmup is smooth even over one epoch:

- warmup: ``f = (step + 1) / warmup_steps`` for the first ``warmup_epochs * steps_per_epoch``
  steps (the first step already has a non-zero lr);
- ``none``: ``f = 1``;
- ``step``: ``f = gamma ** (e // step_size)``, ``e`` the epoch counted from the end of warmup,
  ``step_size`` by default a third of the remaining epochs (decays at 1/3 and 2/3);
- ``cosine``: ``f = floor + (1 - floor) * (1 + cos(pi * t)) / 2`` with ``t`` going from 0 to
  1 over the steps after warmup.

The scheduler's state is its step count; ``state_dict()`` holds plain numbers only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch.optim.lr_scheduler import LambdaLR

__all__ = ["build_scheduler", "lr_factor"]


def lr_factor(
    kind: str,
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    min_lr_ratio: float = 0.0,
    step_size: int | None = None,
    gamma: float = 0.1,
) -> Callable[[int], float]:
    """The factor on every group's base lr at optimizer step ``step`` (0-based)."""
    if kind not in ("none", "step", "cosine"):
        raise ValueError(f"unknown scheduler {kind!r}")
    steps_per_epoch = max(1, steps_per_epoch)
    warmup = warmup_epochs * steps_per_epoch
    main_steps = max(1, (epochs - warmup_epochs) * steps_per_epoch)
    every = step_size or max(1, (epochs - warmup_epochs) // 3)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        after = step - warmup
        if kind == "step":
            return float(gamma ** ((after // steps_per_epoch) // every))
        if kind == "cosine":
            t = min(1.0, after / main_steps)
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str,
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    min_lr_ratio: float = 0.0,
    step_size: int | None = None,
    gamma: float = 0.1,
) -> LambdaLR:
    """A per-step ``LambdaLR`` over every group of ``optimizer`` (module docstring).

    Constructing it sets each group's lr to its step-0 value (``base * f(0)``).
    """
    from torch.optim.lr_scheduler import LambdaLR

    factor = lr_factor(
        kind,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=warmup_epochs,
        min_lr_ratio=min_lr_ratio,
        step_size=step_size,
        gamma=gamma,
    )
    # One function for all groups: the ratio between groups can never drift.
    return LambdaLR(optimizer, lr_lambda=factor)
