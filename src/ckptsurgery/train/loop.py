"""The training loop, read top to bottom: :func:`prepare` builds everything and makes every
check; :func:`train` runs the epochs and writes OUTDIR (see :mod:`ckptsurgery.train.outputs`).

Per epoch: reseed from ``(seed, epoch)``; ``model.train()`` with the frozen BatchNorm layers put
back into eval mode; one optimizer step and one scheduler step per batch; optionally re-estimate
BatchNorm statistics; evaluate; save ``last`` (and ``best``: highest top-1, then lowest loss)
and the resumable state; stop early after ``early_stop`` epochs without a new best.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptsurgery.train.config import TrainConfig
from ckptsurgery.train.errors import TrainError
from ckptsurgery.train.heads import Head

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ckptsurgery.match import MatchReport
    from ckptsurgery.train.data import Splits
    from ckptsurgery.train.loading import LoadResult

__all__ = ["Setup", "TrainResult", "prepare", "train"]

Log = Callable[[str], None]


@dataclass
class Setup:
    """A model ready to train: head replaced, weights loaded, groups built and checked."""

    config: TrainConfig
    splits: Splits
    model: nn.Module
    head: Head
    loaded: LoadResult | None
    optimizer: torch.optim.Optimizer
    frozen_bn: list[nn.Module]
    frozen_reference: dict[str, str]  # digests of the frozen tensors (linear-probe)
    device: torch.device


@dataclass
class TrainResult:
    out: Path | None  # None for a dry run
    head: Head
    classes: tuple[str, ...]
    groups: list[dict[str, Any]]
    report: MatchReport | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    dry_run: bool = False

    @property
    def best(self) -> dict[str, Any] | None:
        return next((m for m in self.metrics if m["epoch"] == self.best_epoch), None)


def prepare(config: TrainConfig, *, log: Log, show: Log) -> Setup:
    """Build the model, replace its head, load the weights, build and check the groups.

    Prints the head found and the loading report (``log``), and the group table (``show``).
    Nothing is written.
    """
    import torch

    from ckptsurgery.models import build_model
    from ckptsurgery.train.bn import frozen_batchnorms, frozen_digests
    from ckptsurgery.train.data import train_splits
    from ckptsurgery.train.groups import (
        build_optimizer,
        check_groups,
        group_table,
        plan_groups,
        set_trainable,
    )
    from ckptsurgery.train.heads import find_head, replace_head
    from ckptsurgery.train.loading import load_weights
    from ckptsurgery.train.runtime import resolve_device

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device, amp=config.amp)
    splits = train_splits(config.data)

    # The model's own initialisation (the from-scratch baseline) and the new head are seeded.
    torch.manual_seed(config.seed)
    built = build_model(config.model, config.model_args, device="cpu")
    if built.note:
        log(f"note: {built.note}")
    model = built.module
    head = find_head(model, config.head)
    log(head.describe())
    head = replace_head(
        model, head, len(splits.classes), generator=torch.Generator().manual_seed(config.seed)
    )
    log(
        f"replaced it with Linear {head.in_features} -> {head.out_features} "
        f"({len(splits.classes)} classes in {splits.train}), N(0, 0.01) weights, zero bias"
    )

    loaded = None
    if config.weights is None:
        log("no --weights: training from the model's own initialisation (from scratch)")
    else:
        loaded = load_weights(
            model,
            head,
            config.weights,
            key=config.key,
            rules=config.rules,
            allow_missing=config.allow_missing,
            allow_unexpected=config.allow_unexpected,
            allow_globals=config.allow_globals,
            unsafe_pickle=config.unsafe_pickle,
            dry_run=config.dry_run,
        )
        if loaded.source_key and not config.key:
            others = ", ".join(loaded.other_entries) or "none"
            log(f"using the state dict at '{loaded.source_key}' (other entries: {others})")
        for rule in loaded.plan.unused_rules:
            log(f"note: {rule} matched no key")
        show(loaded.report.table())
        for key in loaded.dropped_head:
            log(f"dropped {key} from the checkpoint: its shape is the old head's")
        if loaded.loaded_head:
            log(
                f"the checkpoint's {head.name} fits the new head and is loaded "
                f"(drop it with --drop '{head.name}.*' to start from a fresh head)"
            )

    set_trainable(model, head, config.mode)
    model.to(device)
    optimizer = build_optimizer(model, plan_groups(model, head, config), config)
    check_groups(optimizer, model, head, config.mode)
    show(group_table(optimizer))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        log(
            f"frozen: {len(frozen)} tensors, "
            f"{sum(p.numel() for p in model.parameters() if not p.requires_grad):,} parameters"
        )

    frozen_bn = frozen_batchnorms(model, head)
    reference = frozen_digests(model, head) if config.mode == "linear-probe" else {}
    return Setup(config, splits, model, head, loaded, optimizer, frozen_bn, reference, device)


def train(config: TrainConfig, *, log: Log | None = None, show: Log | None = None) -> TrainResult:
    """Fine-tune as ``config`` says and write OUTDIR; see the module docstring.

    ``log`` receives notes and progress (default: stderr), ``show`` the tables (default:
    stdout). With ``config.dry_run`` it stops after the loading report and the group table.
    """
    import torch
    import torch.nn.functional as F

    from ckptsurgery import __version__
    from ckptsurgery.models import build_model
    from ckptsurgery.train import outputs
    from ckptsurgery.train.bn import recalibrate_bn, train_mode, verify_frozen
    from ckptsurgery.train.data import build_transform, default_workers, image_folder, make_loader
    from ckptsurgery.train.evaluation import evaluate_model
    from ckptsurgery.train.groups import group_rows
    from ckptsurgery.train.heads import find_head, replace_head
    from ckptsurgery.train.runtime import Progress, autocast, check_logits, seed_epoch
    from ckptsurgery.train.schedule import build_scheduler

    log = log or _stderr
    show = show or print
    if not config.dry_run:  # refuse a clash with an earlier run before any work
        outputs.prepare_outdir(
            config.out, resume=config.resume, force=config.force, check_only=True
        )
    s = prepare(config, log=log, show=show)
    model, optimizer, device, head = s.model, s.optimizer, s.device, s.head
    classes = s.splits.classes
    report = s.loaded.report if s.loaded is not None else None
    result = TrainResult(None, head, classes, group_rows(optimizer), report)
    if config.dry_run:
        result.dry_run = True
        log("dry run: nothing trained, nothing written")
        return result

    # Data.
    workers = default_workers() if config.workers is None else config.workers
    train_tf = build_transform(config.transform, train=True)
    eval_tf = build_transform(config.transform, train=False)
    train_set = image_folder(s.splits.train, train_tf)
    val_set = image_folder(s.splits.val, eval_tf)
    loader_rng = torch.Generator()
    train_loader = make_loader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        workers=workers,
        device=device,
        generator=loader_rng,
    )
    val_loader = make_loader(
        val_set, batch_size=config.batch_size, shuffle=False, workers=workers, device=device
    )
    # --bn recalibrate: statistics of the training images as evaluation sees them (no augment).
    recal_loader = make_loader(
        image_folder(s.splits.train, eval_tf),
        batch_size=config.batch_size,
        shuffle=False,
        workers=workers,
        device=device,
    )
    steps_per_epoch = len(train_loader)
    log(
        f"data: {len(train_set)} training images ({steps_per_epoch} steps of "
        f"{config.batch_size}), {len(val_set)} in {s.splits.val}, {len(classes)} classes; "
        f"device {device}, {workers} loader workers"
    )

    scheduler = build_scheduler(
        optimizer,
        config.scheduler,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=config.warmup_epochs,
        min_lr_ratio=config.min_lr_ratio,
        step_size=config.step_size,
        gamma=config.gamma,
    )
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp)

    # Output folder, or the state to resume from.
    out = outputs.prepare_outdir(config.out, resume=config.resume, force=config.force)
    result.out = out
    start_epoch, best_epoch, best_key, bad_epochs = 0, None, None, 0
    last_digests: dict[str, str] = {}
    best_digests: dict[str, str] = {}
    if config.resume:
        state = outputs.load_state(out / "last_state.pt")
        saved = TrainConfig.from_dict(state["config"])
        differ = config.differences(saved)
        if differ:
            raise TrainError(
                f"--resume: these options differ from the run in {out}: "
                f"{', '.join(differ)}; resume with the same options"
            )
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_epoch, bad_epochs = (
            state["epoch"],
            state["best_epoch"],
            state["bad_epochs"],
        )
        best_key = tuple(state["best_key"]) if state["best_key"] is not None else None
        best_digests = state["best_digests"]
        last_digests = outputs.digests(state["model"])
        if config.mode == "linear-probe":
            verify_frozen(model, head, s.frozen_reference)
        result.metrics = outputs.read_metrics(out / "metrics.jsonl", upto_epoch=start_epoch)
        outputs.write_metrics(out / "metrics.jsonl", result.metrics)
        log(f"resuming {out} after epoch {start_epoch} of {config.epochs}")
        if config.early_stop is not None and bad_epochs >= config.early_stop:
            result.stopped_early = True
            start_epoch = config.epochs  # it had stopped early: there is nothing left to run
            log("the run had stopped early; nothing left to train")
    else:
        outputs.write_json(
            out / "config.json",
            {
                **config.to_dict(),
                "derived": {
                    "head": head.name,
                    "head_found_by": head.how,
                    "classes": list(classes),
                    "num_classes": len(classes),
                    "groups": result.groups,
                    "train_images": len(train_set),
                    "val_images": len(val_set),
                    "val_folder": str(s.splits.val),
                    "device": str(device),
                    "ckptsurgery": __version__,
                    "torch": torch.__version__,
                },
            },
        )
    meta = {
        "model": config.model,
        "model_args": config.model_args,
        "head": head.name,
        "classes": list(classes),
    }

    progress = Progress(config.progress, steps_per_epoch, log)
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        # The shuffle gets its own stream, distinct from augmentation's and dropout's.
        loader_rng.manual_seed(seed_epoch(config.seed, epoch) ^ 0x5DEECE66D)
        train_mode(model, s.frozen_bn)
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}  # the epoch's first step
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        for step, (x, y) in enumerate(train_loader):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with autocast(device, config.amp):
                logits = check_logits(model(x), len(y), len(classes))
                loss = F.cross_entropy(logits.float(), y)  # mean over the batch
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(scaler.scale(loss))
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach().double() * len(y)  # on the device: no sync per step
            seen += len(y)
            progress.step(epoch, step, loss)
        train_loss = float(loss_sum) / max(seen, 1)  # the one sync of the epoch
        train_seconds = time.perf_counter() - t0
        if not math.isfinite(train_loss):
            raise TrainError(f"epoch {epoch + 1}: the training loss is {train_loss}; lower --lr")

        if config.bn == "recalibrate":
            recalibrate_bn(model, (x.to(device, non_blocking=True) for x, _ in recal_loader))
        metrics = evaluate_model(
            model, val_loader, device=device, num_classes=len(classes), amp=config.amp
        )

        # Best: highest top-1, then lowest loss.
        key = (metrics.top1, -metrics.loss)
        improved = best_key is None or key > best_key
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": metrics.loss,
            "top1": metrics.top1,
            "top5": metrics.top5,
            "lr": lrs,
            "seconds": round(time.perf_counter() - t0, 3),
            "train_seconds": round(train_seconds, 3),
            "best": improved,
        }
        epoch_meta = {**meta, "epoch": epoch + 1, "top1": metrics.top1}
        last_sd = outputs.save_weights(model, out / "last.safetensors", metadata=epoch_meta)
        last_digests = outputs.digests(last_sd)
        if improved:
            best_epoch, best_key, bad_epochs = epoch + 1, key, 0
            outputs.save_weights(model, out / "best.safetensors", metadata=epoch_meta)
            best_digests = last_digests
        else:
            bad_epochs += 1
        outputs.append_metrics(out / "metrics.jsonl", record)
        result.metrics.append(record)
        sched_state = scheduler.state_dict()
        outputs.save_state(
            out / "last_state.pt",
            {
                "config": config.to_dict(),
                "epoch": epoch + 1,
                "model": last_sd,
                "optimizer": optimizer.state_dict(),
                "scheduler": sched_state,
                "scaler": scaler.state_dict(),
                "best_epoch": best_epoch,
                "best_key": list(best_key) if best_key is not None else None,
                "bad_epochs": bad_epochs,
                "best_digests": best_digests,
            },
        )
        progress.epoch_line(record, config.epochs)
        if config.early_stop is not None and bad_epochs >= config.early_stop:
            result.stopped_early = True
            log(f"early stop: no better top-1 for {bad_epochs} epochs (best: epoch {best_epoch})")
            break

    # The sanity checks: the frozen backbone did not move; both files reload strictly.
    if config.mode == "linear-probe":
        verify_frozen(model, head, s.frozen_reference)
        log(
            f"checked: all {len(s.frozen_reference)} frozen tensors are bit-identical to the "
            "loaded ones"
        )
    for name, expected in (("last.safetensors", last_digests), ("best.safetensors", best_digests)):
        fresh = build_model(config.model, config.model_args, device="meta").module
        replace_head(fresh, find_head(fresh, head.name), len(classes))
        fresh.to_empty(device="cpu")
        outputs.check_reload(out / name, fresh, expected)
    log(
        f"checked: last.safetensors and best.safetensors load strictly into a fresh "
        f"{config.model} and hold the weights as evaluated"
    )
    result.best_epoch = best_epoch
    return result


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
