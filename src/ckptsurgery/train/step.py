"""One training epoch: forward, loss, backward and the optimizer steps, with timm's recipe.

Per batch: the images go to the device (``channels_last`` with ``--channels-last``), are
mixed with ``--mixup`` / ``--cutmix`` (:mod:`ckptsurgery.train.mixing`), pass through the
model under autocast (``--amp``), and the loss (cross-entropy, label-smoothed with
``--label-smoothing``, or the soft-target cross-entropy of mixed targets) is divided by the
number of batches in its accumulation window and backpropagated.

With ``--accum-steps N`` the gradients of ``N`` consecutive batches add up before one optimizer
step (the epoch's last window may be shorter; its batches are divided by its own length), so
``N`` batches of ``B`` take the step that one batch of ``N * B`` would. Under torchrun the
accumulating batches skip DDP's gradient all-reduce (``no_sync``); the last of a window syncs.
At each optimizer step: the gradients are unscaled (fp16), clipped to the global L2 norm
``--clip-grad`` (``clip_grad_norm_`` over every trained parameter, as timm's
``dispatch_clip_grad`` in its default ``norm`` mode), the optimizer and the per-step
scheduler step, and the EMA (``--ema``) is updated from the bare model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptsurgery.train.config import TrainConfig

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn
    from torch.optim.lr_scheduler import LRScheduler
    from torch.utils.data import DataLoader

    from ckptsurgery.train.distributed import Dist
    from ckptsurgery.train.ema import Ema
    from ckptsurgery.train.runtime import Progress

__all__ = ["Stepper", "optimizer_steps"]


def optimizer_steps(batches: int, accum_steps: int) -> int:
    """Optimizer steps in an epoch of ``batches`` batches: one per window of ``accum_steps``."""
    return max(1, math.ceil(batches / accum_steps))


@dataclass
class Stepper:
    """What an epoch of training needs; :meth:`epoch` runs one."""

    config: TrainConfig
    model: nn.Module  # the bare module (EMA source, clipping)
    net: Callable[..., Any]  # what runs the forward: DDP and/or torch.compile around `model`
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    num_classes: int
    dist: Dist
    ema: Ema | None = None

    def criterion(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The batch-mean loss: soft targets (mixed) or class indices (label-smoothed)."""
        import torch.nn.functional as F

        from ckptsurgery.train.mixing import soft_target_cross_entropy

        if target.is_floating_point():
            return soft_target_cross_entropy(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=self.config.label_smoothing)

    def epoch(
        self,
        loader: DataLoader[Any],
        epoch: int,
        progress: Progress,
        *,
        rng: np.random.RandomState,
    ) -> tuple[torch.Tensor, int]:
        """Train one epoch; returns the summed loss (on the device) and the samples seen."""
        import torch

        from ckptsurgery.train.mixing import Mixup
        from ckptsurgery.train.runtime import autocast, check_logits

        config = self.config
        mixup = None
        if config.mixes:
            mixup = Mixup(
                mixup_alpha=config.mixup,
                cutmix_alpha=config.cutmix,
                prob=config.mix_prob,
                switch_prob=config.mix_switch_prob,
                label_smoothing=config.label_smoothing,
                num_classes=self.num_classes,
                rng=rng,
            )
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        memory_format = torch.channels_last if config.channels_last else torch.preserve_format
        batches = len(loader)
        n = config.accum_steps
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = 0
        self.optimizer.zero_grad(set_to_none=True)
        for step, (x, y) in enumerate(loader):
            x = x.to(self.device, non_blocking=True)
            if x.dim() == 4:
                x = x.contiguous(memory_format=memory_format)
            y = y.to(self.device, non_blocking=True)
            target = mixup(x, y) if mixup is not None else y
            start = step - step % n
            window = min(n, batches - start)  # the epoch's last window may be shorter
            update = step + 1 == start + window
            no_sync = getattr(self.net, "no_sync", None)
            quiet = self.dist.enabled and not update and no_sync is not None
            with no_sync() if quiet else contextlib.nullcontext():  # type: ignore[misc]
                with autocast(self.device, config.amp):
                    logits = check_logits(self.net(x), len(y), self.num_classes)
                    loss = self.criterion(logits.float(), target)  # mean over the batch
                torch.autograd.backward(self.scaler.scale(loss / window))
            if update:
                self._update(params)
            loss_sum += loss.detach().double() * len(y)  # on the device: no sync per step
            seen += len(y)
            progress.step(epoch, step, loss)
        return loss_sum, seen

    def _update(self, params: list[torch.Tensor]) -> None:
        import torch

        if self.config.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients (fp16)
            torch.nn.utils.clip_grad_norm_(params, self.config.clip_grad, norm_type=2.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
