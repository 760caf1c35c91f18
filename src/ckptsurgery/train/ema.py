"""An exponential moving average of the weights (``--ema DECAY``), as timm's ``ModelEmaV3``.

The EMA is a copy of the model, in eval mode, updated after every optimizer step ``n``
(1-based) with ``ema = decay_n * ema + (1 - decay_n) * model`` over every floating-point tensor
of the state dict, parameters and buffers (BatchNorm statistics included); integer buffers
(``num_batches_tracked``) are copied. ``decay_n`` is ModelEmaV3's ``get_decay(n)``:

- ``0`` at the first update (the EMA starts as the model);
- with warmup (``--ema-warmup``, the default): ``min(decay, 1 - (1 + k) ** -(2/3))`` with
  ``k = n - 1``, so a short fine-tuning run is not dominated by the initial weights;
- without: ``decay``.

The trainer evaluates the EMA each epoch beside the raw model and writes it to
``OUTDIR/ema.safetensors``; the tests check the numbers against timm's class.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = ["WARMUP_GAMMA", "WARMUP_POWER", "Ema", "ema_decay"]

WARMUP_GAMMA = 1.0  # ModelEmaV3's defaults
WARMUP_POWER = 2 / 3


def ema_decay(decay: float, step: int, *, warmup: bool = True) -> float:
    """The decay at optimizer step ``step`` (1-based), as ModelEmaV3's ``get_decay(step)``."""
    k = max(0, step - 1)
    if k <= 0:
        return 0.0
    if not warmup:
        return decay
    warmed: float = 1 - (1 + k / WARMUP_GAMMA) ** -WARMUP_POWER
    return max(min(warmed, decay), 0.0)


class Ema:
    """The moving average of ``model`` (a deep copy, in eval mode, without gradients)."""

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    def update(self, model: nn.Module) -> float:
        """One update from ``model`` after an optimizer step; returns the decay used."""
        import torch

        self.updates += 1
        decay = ema_decay(self.decay, self.updates, warmup=self.warmup)
        with torch.no_grad():
            ema_values, model_values = [], []
            mine, theirs = self.module.state_dict(), model.state_dict()
            for key, e in mine.items():
                m = theirs[key]
                if e.is_floating_point():
                    ema_values.append(e)
                    model_values.append(m.detach())
                else:
                    e.copy_(m)
            if ema_values:
                torch._foreach_lerp_(ema_values, model_values, 1.0 - decay)
        return decay
