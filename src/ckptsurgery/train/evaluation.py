"""Evaluation: exact loss, top-1 and top-5 over a whole split; and the ``evaluate`` command's
library function (a model SPEC, a checkpoint and a data folder in, metrics out)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptsurgery.errors import IncompatibleCheckpoint
from ckptsurgery.train.config import TransformConfig
from ckptsurgery.train.heads import Head

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from ckptsurgery.match import MatchReport
    from ckptsurgery.train.distributed import Dist

__all__ = ["EvalMetrics", "EvaluateResult", "evaluate", "evaluate_model"]


@dataclass(frozen=True)
class EvalMetrics:
    """Mean cross-entropy, top-1 and top-5 accuracy (None with 5 classes or fewer)."""

    loss: float
    top1: float
    top5: float | None
    samples: int

    def to_json(self) -> dict[str, Any]:
        return {"loss": self.loss, "top1": self.top1, "top5": self.top5, "samples": self.samples}


def evaluate_model(
    model: nn.Module,
    loader: DataLoader[Any],
    *,
    device: torch.device,
    num_classes: int,
    amp: bool | str | None = None,
    dist: Dist | None = None,
    channels_last: bool = False,
) -> EvalMetrics:
    """Evaluate ``model`` on every sample of ``loader`` (eval mode, no gradients).

    The sums are kept on the device and read once at the end; the loss is the mean over
    samples of the float32 cross-entropy. Under ``torchrun`` (``dist``) each process passes its
    own part of the split (:func:`~ckptsurgery.train.distributed.shard_indices`) and the sums
    are added up over the processes, so the metrics are those of the whole split.
    """
    import torch
    import torch.nn.functional as F

    from ckptsurgery.train.distributed import all_reduce_sum
    from ckptsurgery.train.runtime import autocast, check_logits

    model.eval()
    # loss sum, top-1 correct, top-5 correct, samples: float64 counts are exact below 2**53.
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    k = 5 if num_classes > 5 else 0
    with torch.no_grad():
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast(device, amp):
                out = model(x)
            logits = check_logits(out, len(y), num_classes).float()
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
            sums[1] += (logits.argmax(dim=1) == y).sum()
            if k:
                top = logits.topk(k, dim=1).indices
                sums[2] += (top == y[:, None]).any(dim=1).sum()
            sums[3] += len(y)
    if dist is not None:
        all_reduce_sum(sums, dist)
    loss_sum, correct1, correct5, count = sums.tolist()  # the one sync
    samples = round(count)
    n = max(samples, 1)
    return EvalMetrics(
        loss=loss_sum / n,
        top1=round(correct1) / n,
        top5=round(correct5) / n if k else None,
        samples=samples,
    )


@dataclass(frozen=True)
class EvaluateResult:
    metrics: EvalMetrics
    folder: Path
    classes: tuple[str, ...]
    head: Head
    report: MatchReport
    notes: list[str] = field(default_factory=list)


def evaluate(
    model: str,
    weights: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    model_args: dict[str, Any] | None = None,
    head: str | None = None,
    key: str | None = None,
    transform: TransformConfig | None = None,
    batch_size: int = 64,
    device: str = "auto",
    amp: bool | str | None = None,
    threads: int | None = None,
    workers: int | None = None,
    allow_globals: Sequence[str] = (),
    unsafe_pickle: bool = False,
    log: Callable[[str], None] | None = None,
) -> EvaluateResult:
    """Loss and accuracy of ``model`` with ``weights`` on ``data``.

    The split is ``data/test``, else ``data/val``, else ``data`` itself. The model's head is
    sized to the split's classes and the checkpoint must fill every key (head included), as
    a strict ``load_state_dict`` would: otherwise :class:`IncompatibleCheckpoint` with the
    report. The checkpoint goes through the surgery pipeline (:mod:`ckptsurgery.plan`): its
    header is planned and matched first, and tensors are read only when it fits.
    ``transform`` must be the one the model was trained with.
    """
    import torch

    from ckptsurgery.io import open_checkpoint
    from ckptsurgery.loading import load_into
    from ckptsurgery.models import build_model
    from ckptsurgery.plan.build import build_plan
    from ckptsurgery.plan.execute import PlanSource, materialize
    from ckptsurgery.plan.gate import Gate
    from ckptsurgery.rules import Rules
    from ckptsurgery.train.data import (
        default_workers,
        eval_folder,
        folder_classes,
        image_folder,
        make_loader,
    )
    from ckptsurgery.train.heads import find_head, replace_head
    from ckptsurgery.train.runtime import resolve_device

    say = log or (lambda _: None)
    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device(device, amp=amp)
    folder = eval_folder(data)
    classes = folder_classes(folder)
    options = transform or TransformConfig()
    dataset = image_folder(folder, _eval_transform(options), allow_empty=True)

    # The checkpoint's header first: a wrong path or a bad file costs no model build.
    with open_checkpoint(
        weights, key=key, allow_globals=tuple(allow_globals), unsafe_pickle=unsafe_pickle
    ) as ckpt:
        built = build_model(model, model_args or {}, device="cpu")
        notes = [built.note] if built.note else []
        found = find_head(built.module, head)
        say(found.describe())
        new_head = replace_head(built.module, found, len(classes))
        say(f"sized to the {len(classes)} classes of {folder}")
        plan = build_plan([ckpt], [Rules()], mode="remap", labels=[str(weights)])
        check = Gate(built.module).check(PlanSource(plan, [ckpt]))
        if not check.compatible:
            hint = ""
            if any(m.key.startswith(new_head.name + ".") for m in check.shape_mismatch):
                hint = (
                    f" (the data in {folder} has {len(classes)} classes; the checkpoint's "
                    "head was trained for another number)"
                )
            raise IncompatibleCheckpoint(
                f"{weights}: the checkpoint does not fit the model ({check.problems()}){hint}",
                report=check,
            )
        sd, _ = materialize(plan, [ckpt])
    report = load_into(built.module, sd)
    net = built.module.to(dev)
    loader = make_loader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        workers=default_workers() if workers is None else workers,
        device=dev,
    )
    metrics = evaluate_model(net, loader, device=dev, num_classes=len(classes), amp=amp)
    return EvaluateResult(metrics, folder, classes, new_head, report, notes)


def _eval_transform(options: TransformConfig) -> Any:
    from ckptsurgery.train.data import build_transform

    return build_transform(options, train=False)
