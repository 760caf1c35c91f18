"""Device choice, seeding and the model-output check shared by training and evaluation."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ckptsurgery.train.errors import TrainError

if TYPE_CHECKING:
    import torch

__all__ = ["Progress", "amp_dtype_name", "autocast", "check_logits", "resolve_device", "seed_epoch"]


def resolve_device(
    name: str, *, amp: bool | str | None = None, local_rank: int | None = None
) -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Under torchrun (``local_rank`` given) a CUDA device is ``cuda:LOCAL_RANK``, one GPU per
    process, and an explicit ``cuda:N`` is refused.
    """
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise TrainError(
            f"--device {name!r} is not a device (cpu, cuda, cuda:1, auto): {e}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise TrainError(f"--device {name}: only cpu and cuda are supported")
    if amp_dtype_name(amp) == "fp16" and device.type != "cuda":
        raise TrainError(
            "--amp fp16 (float16 autocast and gradient scaling) needs a CUDA device; on the "
            "CPU use --amp bf16 or no --amp"
        )
    if local_rank is not None and device.type == "cuda":
        if device.index is not None:
            raise TrainError(
                f"--device {name}: under torchrun each process takes the GPU of its "
                "LOCAL_RANK; pass --device cuda (or auto) and choose GPUs with "
                "CUDA_VISIBLE_DEVICES"
            )
        if local_rank >= torch.cuda.device_count():
            raise TrainError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                "visible; start at most one process per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> int:
    """Seed torch (every device) and ``random`` for ``epoch``; returns the seed used.

    Each epoch starts from a state that depends on ``(seed, epoch)`` only (and the process's
    ``rank`` under torchrun, so that processes draw different augmentations and dropout
    masks), so a resumed run draws the same shuffles, augmentations and dropout masks as an
    uninterrupted one.
    """
    import torch

    epoch_seed = (seed * 1_000_003 + epoch + rank * 0x9E3779B97F4A7C15) % 2**63
    torch.manual_seed(epoch_seed)  # also seeds every CUDA device
    random.seed(epoch_seed)
    return epoch_seed


def check_logits(logits: object, batch: int, num_classes: int) -> torch.Tensor:
    """The model's output as a ``[batch, num_classes]`` tensor, or a clear :class:`TrainError`."""
    import torch

    if not isinstance(logits, torch.Tensor):
        raise TrainError(
            f"the model returned a {type(logits).__name__}, not a tensor of logits; the trainer "
            "needs a classifier whose forward returns [batch, classes] (auxiliary outputs off)"
        )
    if tuple(logits.shape) != (batch, num_classes):
        raise TrainError(
            f"the model returned logits of shape {list(logits.shape)} for a batch of {batch} "
            f"images and {num_classes} classes; is the head the last layer (see --head)?"
        )
    return logits


def amp_dtype_name(amp: bool | str | None) -> str | None:
    """``--amp``'s value as ``fp16``, ``bf16`` or None; ``True`` (the former flag) is fp16."""
    if amp is True:
        return "fp16"
    if amp is False or amp is None:
        return None
    if amp not in ("fp16", "bf16"):
        raise TrainError(f"--amp must be fp16 or bf16, got {amp!r}")
    return amp


def autocast(
    device: torch.device, amp: bool | str | None
) -> contextlib.AbstractContextManager[Any]:
    """Autocast to float16 (``--amp fp16``, CUDA) or bfloat16 (``--amp bf16``, CUDA or the
    CPU); otherwise nothing (full float32)."""
    import torch

    name = amp_dtype_name(amp)
    if name is None:
        return contextlib.nullcontext()
    dtype = torch.float16 if name == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


StepCallback = Callable[[int, int, int, int, float], None]
"""``on_step(epoch, epochs, step, steps, loss)``, 1-based epoch and step: what a progress bar
draws. The command line draws it (:func:`ckptsurgery.render.progress.step_progress`)."""


class Progress:
    """Reports training steps to ``on_step`` and each finished epoch to ``log``.

    Steps are reported at most ~50 times an epoch and 10 times a second, and always at the
    epoch's last step: reading the loss synchronises with the device, so it is read only when
    reported. With no ``on_step``, nothing but the epoch lines.
    """

    def __init__(
        self,
        on_step: StepCallback | None,
        steps: int,
        log: Callable[[str], None],
        *,
        epochs: int = 0,
    ) -> None:
        self.on_step = on_step
        self.steps = steps
        self.epochs = epochs
        self.log = log
        self.every = max(1, steps // 50)
        self.reported = 0.0

    def step(self, epoch: int, step: int, loss: torch.Tensor) -> None:
        if self.on_step is None:
            return
        now = time.monotonic()
        if step == 0:
            self.reported = 0.0
        last = step + 1 == self.steps
        if not last and ((step + 1) % self.every or now - self.reported < 0.1):
            return
        self.reported = now
        self.on_step(epoch + 1, self.epochs, step + 1, self.steps, float(loss.item()))

    def epoch_line(self, r: dict[str, Any], epochs: int) -> None:
        top5 = f" top5 {r['top5']:.4f}" if r["top5"] is not None else ""
        ema = r.get("ema")
        if ema is not None:
            top5 += f", EMA val loss {ema['val_loss']:.4f} top1 {ema['top1']:.4f}"
        lrs = " ".join(f"{g}={lr:.3g}" for g, lr in r["lr"].items())
        self.log(
            f"epoch {r['epoch']}/{epochs}: train loss {r['train_loss']:.4f}, val loss "
            f"{r['val_loss']:.4f}, top1 {r['top1']:.4f}{top5}, lr {lrs}, "
            f"{r['seconds']:.1f}s{' *best*' if r['best'] else ''}"
        )


def autograd_node_kinds(t: torch.Tensor) -> list[str]:
    """The type names of every autograd node that ``t`` was computed through, sorted: what a
    backward from ``t`` would visit (a linear probe's logits: the head's nodes only)."""
    seen: set[Any] = set()
    stack = [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack += [n for n, _ in node.next_functions]
    return sorted(type(n).__name__ for n in seen)
