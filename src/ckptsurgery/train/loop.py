"""The training loop, read top to bottom: :func:`~ckptsurgery.train.setup.prepare` builds
everything and makes every check; :func:`train` runs the epochs and writes OUTDIR (see
:mod:`ckptsurgery.train.outputs`).

Per epoch: reseed from ``(seed, epoch)``; ``model.train()`` with the frozen BatchNorm layers put
back into eval mode; one optimizer step and one scheduler step per ``accum_steps`` batches, with
mixing, clipping and the EMA update (:mod:`ckptsurgery.train.step`); optionally re-estimate
BatchNorm statistics; evaluate (and the EMA); save ``last`` (and ``best``: highest top-1, then
lowest loss), ``ema``, the top-k kept checkpoints (:mod:`ckptsurgery.train.keep`) and the
resumable state; stop early after ``early_stop`` epochs without a new best. At the end: the
kept checkpoints' average is written and evaluated, and ``curves.png`` drawn.

Under ``torchrun`` the same code runs in every process, with the model in
DistributedDataParallel, the data split between the processes and the metrics summed over
them; rank 0 prints and writes (see :mod:`ckptsurgery.train.distributed`).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ckptsurgery.train.config import TrainConfig
from ckptsurgery.train.errors import TrainError
from ckptsurgery.train.heads import Head
from ckptsurgery.train.setup import Setup, prepare

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

    from ckptsurgery.match import MatchReport
    from ckptsurgery.plan.model import Plan
    from ckptsurgery.train.distributed import Dist
    from ckptsurgery.train.keep import TopK
    from ckptsurgery.train.runtime import StepCallback

__all__ = ["Setup", "TrainResult", "prepare", "train"]

Log = Callable[[str], None]

# Where notes go when the caller gives no ``log``: the library itself never prints.
_logger = logging.getLogger("ckptsurgery.train")


@dataclass
class TrainResult:
    out: Path | None  # None for a dry run
    head: Head
    classes: tuple[str, ...]
    groups: list[dict[str, Any]]
    report: MatchReport | None
    plan: Plan | None = None  # the surgery that loaded --weights
    metrics: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    averaged: dict[str, Any] | None = None  # --average-top-k: the epochs and the metrics
    dry_run: bool = False
    world_size: int = 1  # processes under torchrun
    rank: int = 0  # this process's rank: only rank 0 prints

    @property
    def best(self) -> dict[str, Any] | None:
        return next((m for m in self.metrics if m["epoch"] == self.best_epoch), None)


def train(
    config: TrainConfig,
    *,
    log: Log | None = None,
    show: Log | None = None,
    fmt: str = "simple",
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Fine-tune as ``config`` says and write OUTDIR; see the module docstring.

    ``log`` receives notes and the epoch lines (default: the ``ckptsurgery.train`` logger),
    ``show`` the tables (default: the same logger) in the tabulate format ``fmt``,
    ``on_step(epoch, epochs, step, steps, loss)`` the training steps as they go (for a
    progress bar); under torchrun only rank 0 reports. The library prints nothing itself. With
    ``config.dry_run`` it stops after the loading report and the group table.
    """
    from ckptsurgery.train import distributed, outputs
    from ckptsurgery.train.groups import group_rows

    log = log or _logger.info
    show = show or _logger.info
    dist = distributed.from_env()
    if not dist.main:  # one process speaks for all
        log = show = _silent
    if not config.dry_run:  # refuse a clash with an earlier run before any work
        outputs.prepare_outdir(
            config.out, resume=config.resume, force=config.force, check_only=True
        )
    s = prepare(config, log=log, show=show, dist=dist, fmt=fmt)
    report = s.loaded.report if s.loaded is not None else None
    plan = s.loaded.plan if s.loaded is not None else None
    result = TrainResult(None, s.head, s.splits.classes, group_rows(s.optimizer), report, plan)
    result.world_size, result.rank = dist.world, dist.rank
    if config.dry_run:
        result.dry_run = True
        log("dry run: nothing trained, nothing written")
        return result
    dist = distributed.join(dist, s.device)
    try:
        _run(s, result, dist, log=log, on_step=on_step)
    finally:
        distributed.leave(dist)
    return result


def _run(
    s: Setup, result: TrainResult, dist: Dist, *, log: Log, on_step: StepCallback | None
) -> None:
    """The epochs of :func:`train`, after :func:`prepare`; fills ``result``."""
    import numpy as np
    import torch
    from torch.utils.data import Subset
    from torch.utils.data.distributed import DistributedSampler

    from ckptsurgery._version import __version__
    from ckptsurgery.train import distributed, outputs
    from ckptsurgery.train.bn import recalibrate_bn, train_mode, verify_frozen
    from ckptsurgery.train.data import build_transform, default_workers, image_folder, make_loader
    from ckptsurgery.train.ema import Ema
    from ckptsurgery.train.evaluation import evaluate_model
    from ckptsurgery.train.keep import TopK
    from ckptsurgery.train.runtime import Progress, seed_epoch
    from ckptsurgery.train.schedule import build_scheduler
    from ckptsurgery.train.step import Stepper, optimizer_steps

    config = s.config
    model, optimizer, device, head = s.model, s.optimizer, s.device, s.head
    classes = s.splits.classes
    main = dist.main  # rank 0 writes OUTDIR; every rank trains and evaluates

    # Data.
    workers = default_workers() if config.workers is None else config.workers
    train_tf = build_transform(config.transform, train=True)
    eval_tf = build_transform(config.transform, train=False)
    train_set = image_folder(s.splits.train, train_tf)
    val_set = image_folder(s.splits.val, eval_tf)
    recal_set = image_folder(s.splits.train, eval_tf)
    val_images = len(val_set)
    loader_rng = torch.Generator()
    sampler: DistributedSampler[Any] | None = None
    if dist.enabled:
        # Training: each process its share, reshuffled every epoch (set_epoch). Evaluation and
        # BN recalibration: cut by index, nothing padded, so every sample counts once.
        sampler = DistributedSampler(
            train_set, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=config.seed
        )
        val_set = Subset(val_set, distributed.shard_indices(val_images, dist))
        recal_set = Subset(recal_set, distributed.shard_indices(len(recal_set), dist))
    train_loader = make_loader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        workers=workers,
        device=device,
        generator=loader_rng,
        sampler=sampler,
    )
    val_loader = make_loader(
        val_set, batch_size=config.batch_size, shuffle=False, workers=workers, device=device
    )
    # --bn recalibrate: statistics of the training images as evaluation sees them (no augment).
    recal_loader = make_loader(
        recal_set, batch_size=config.batch_size, shuffle=False, workers=workers, device=device
    )
    steps_per_epoch = len(train_loader)
    per_process = ""
    if dist.enabled:
        per_process = (
            f" per process, {dist.world} processes ({dist.backend}), global batch "
            f"{config.batch_size * dist.world}"
        )
    log(
        f"data: {len(train_set)} training images ({steps_per_epoch} steps of "
        f"{config.batch_size}{per_process}), {val_images} in {s.splits.val}, "
        f"{len(classes)} classes; device {device}, {workers} loader workers"
    )

    scheduler = build_scheduler(  # stepped once per optimizer step
        optimizer,
        config.scheduler,
        epochs=config.epochs,
        steps_per_epoch=optimizer_steps(steps_per_epoch, config.accum_steps),
        warmup_epochs=config.warmup_epochs,
        min_lr_ratio=config.min_lr_ratio,
        step_size=config.step_size,
        gamma=config.gamma,
    )
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp == "fp16")
    ema = Ema(model, config.ema, warmup=config.ema_warmup) if config.ema is not None else None

    # Output folder, or the state to resume from.
    out = Path(config.out)
    if main:
        out = outputs.prepare_outdir(config.out, resume=config.resume, force=config.force)
    result.out = out
    start_epoch, best_epoch, best_key, bad_epochs = 0, None, None, 0
    top = TopK(out, config.keep_top_k) if config.keep_top_k is not None else None
    last_digests: dict[str, str] = {}
    ema_digests: dict[str, str] = {}
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
        if ema is not None:
            ema.module.load_state_dict(state["ema"], strict=True)
            ema.updates = state["ema_updates"]
        if top is not None:
            top = TopK.from_state(out, top.k, state.get("top_k"))
        start_epoch, best_epoch, bad_epochs = (
            state["epoch"],
            state["best_epoch"],
            state["bad_epochs"],
        )
        best_key = tuple(state["best_key"]) if state["best_key"] is not None else None
        best_digests = state["best_digests"]
        last_digests = outputs.digests(state["model"])
        if ema is not None:
            ema_digests = outputs.digests(state["ema"])
        if config.mode == "linear-probe":
            verify_frozen(model, head, s.frozen_reference)
        result.metrics = outputs.read_metrics(out / "metrics.jsonl", upto_epoch=start_epoch)
        if main:
            outputs.write_metrics(out / "metrics.jsonl", result.metrics)
        log(f"resuming {out} after epoch {start_epoch} of {config.epochs}")
        if state.get("world_size", 1) != dist.world:
            log(
                f"note: the run was made with {state.get('world_size', 1)} process(es), this "
                f"one has {dist.world}: the data order differs from an uninterrupted run"
            )
        if config.early_stop is not None and bad_epochs >= config.early_stop:
            result.stopped_early = True
            start_epoch = config.epochs  # it had stopped early: there is nothing left to run
            log("the run had stopped early; nothing left to train")
    elif main:
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
                    "val_images": val_images,
                    "val_folder": str(s.splits.val),
                    "device": str(device),
                    "world_size": dist.world,
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

    # The model that trains: DistributedDataParallel under torchrun (gradients averaged over
    # the processes). `model` stays the bare module: evaluated, saved, checked.
    net = distributed.wrap(model, dist, device)
    if config.compile:  # the bare `model` is what is saved: no `_orig_mod.` in any key
        net = cast(torch.nn.Module, torch.compile(net))
    stepper = Stepper(
        config, model, net, optimizer, scheduler, scaler, device, len(classes), dist, ema
    )
    progress = Progress(on_step if main else None, steps_per_epoch, log, epochs=config.epochs)
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        # The shuffle gets its own stream, distinct from augmentation's and dropout's.
        epoch_seed = seed_epoch(config.seed, epoch, dist.rank)
        loader_rng.manual_seed(epoch_seed ^ 0x5DEECE66D)
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_mode(model, s.frozen_bn)
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}  # the epoch's first step
        mix_rng = np.random.RandomState((epoch_seed ^ 0x3C6EF372) % 2**32)  # mixup's own draws
        loss_sum, seen = stepper.epoch(train_loader, epoch, progress, rng=mix_rng)
        sums = torch.stack([loss_sum, loss_sum.new_tensor(seen)])  # over the processes
        total_loss, total_seen = distributed.all_reduce_sum(sums, dist).tolist()  # one sync
        train_loss = total_loss / max(total_seen, 1)
        train_seconds = time.perf_counter() - t0
        if not math.isfinite(train_loss):
            raise TrainError(f"epoch {epoch + 1}: the training loss is {train_loss}; lower --lr")

        if config.bn == "recalibrate":
            recalibrate_bn(model, (x.to(device, non_blocking=True) for x, _ in recal_loader))
        distributed.sync_replicas(model, dist, frozen_bn=s.frozen_bn)
        if ema is not None:  # the EMA's BatchNorm statistics follow each rank's own batches
            distributed.sync_replicas(ema.module, dist)
        evaluate = functools.partial(
            evaluate_model,
            loader=val_loader,
            device=device,
            num_classes=len(classes),
            amp=config.amp,
            dist=dist,
            channels_last=config.channels_last,
        )
        metrics = evaluate(model)
        ema_metrics = evaluate(ema.module) if ema is not None else None

        # Best: highest top-1, then lowest loss.
        key = (metrics.top1, -metrics.loss)
        improved = best_key is None or key > best_key
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": metrics.loss,
            "top1": metrics.top1,
            "top5": metrics.top5,
            "samples": metrics.samples,
            "lr": lrs,
            "seconds": round(time.perf_counter() - t0, 3),
            "train_seconds": round(train_seconds, 3),
            "best": improved,
        }
        if ema_metrics is not None:
            record["ema"] = {
                "val_loss": ema_metrics.loss,
                "top1": ema_metrics.top1,
                "top5": ema_metrics.top5,
            }
        if improved:
            best_epoch, best_key, bad_epochs = epoch + 1, key, 0
        else:
            bad_epochs += 1
        result.metrics.append(record)
        epoch_meta = {**meta, "epoch": epoch + 1, "top1": metrics.top1}
        if top is not None:  # every rank ranks; rank 0 writes
            top.offer(model, epoch + 1, key, metadata=epoch_meta, write=main)
        if main:
            last_sd = outputs.save_weights(model, out / "last.safetensors", metadata=epoch_meta)
            last_digests = outputs.digests(last_sd)
            if improved:
                outputs.save_weights(model, out / "best.safetensors", metadata=epoch_meta)
                best_digests = last_digests
            if ema is not None:
                ema_sd = outputs.save_weights(
                    ema.module, out / "ema.safetensors", metadata={**epoch_meta, "ema": config.ema}
                )
                ema_digests = outputs.digests(ema_sd)
            outputs.append_metrics(out / "metrics.jsonl", record)
            outputs.save_state(
                out / "last_state.pt",
                {
                    "config": config.to_dict(),
                    "epoch": epoch + 1,
                    "model": last_sd,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "best_epoch": best_epoch,
                    "best_key": list(best_key) if best_key is not None else None,
                    "bad_epochs": bad_epochs,
                    "best_digests": best_digests,
                    "world_size": dist.world,
                    "ema": outputs.cpu_state_dict(ema.module) if ema is not None else None,
                    "ema_updates": ema.updates if ema is not None else 0,
                    "top_k": top.to_state() if top is not None else None,
                },
            )
        progress.epoch_line(record, config.epochs)
        if config.early_stop is not None and bad_epochs >= config.early_stop:
            result.stopped_early = True
            log(f"early stop: no better top-1 for {bad_epochs} epochs (best: epoch {best_epoch})")
            break
    result.best_epoch = best_epoch
    if config.average_top_k and top is not None:
        result.averaged = _average(top, model, val_loader, dist, len(classes), config, log=log)

    # The sanity checks: the frozen backbone did not move; both files reload strictly.
    if config.mode == "linear-probe":
        verify_frozen(model, head, s.frozen_reference)
        log(
            f"checked: all {len(s.frozen_reference)} frozen tensors are bit-identical to the "
            "loaded ones"
        )
    if main:
        names = ["last.safetensors", "best.safetensors"]
        checks = [("last.safetensors", last_digests), ("best.safetensors", best_digests)]
        if ema is not None:
            checks.append(("ema.safetensors", ema_digests))
            names.append("ema.safetensors")
        _check_outputs(config, head, len(classes), out, checks)
        log(
            f"checked: {', '.join(names)} load strictly into a fresh {config.model} and hold "
            "the weights as evaluated"
        )
        if importlib.util.find_spec("matplotlib") is not None:  # the plot extra
            from ckptsurgery.render.plots import plot_curves

            plot_curves(result.metrics, out / "curves.png")
    distributed.barrier(dist)  # every process returns once OUTDIR is complete


def _average(
    top: TopK,
    model: torch.nn.Module,
    val_loader: DataLoader[Any],
    dist: Dist,
    num_classes: int,
    config: TrainConfig,
    *,
    log: Log,
) -> dict[str, Any] | None:
    """Write the kept checkpoints' mean to ``averaged.safetensors`` (rank 0), load it strictly
    into a copy of the model and evaluate it (every rank); the epochs and metrics, also written
    to ``averaged.json``."""
    import copy

    from ckptsurgery.surgery import load_state_dict
    from ckptsurgery.train import distributed, outputs
    from ckptsurgery.train.evaluation import evaluate_model
    from ckptsurgery.train.keep import average_kept

    if len(top.kept) < 2:
        log(f"--average-top-k: {len(top.kept)} checkpoint kept, nothing to average")
        return None
    target = top.out / "averaged.safetensors"
    if dist.main:
        average_kept(top, target)
    distributed.barrier(dist)
    averaged = copy.deepcopy(model)
    averaged.load_state_dict(load_state_dict(target), strict=True)
    device = next(model.parameters()).device
    m = evaluate_model(
        averaged.to(device),
        val_loader,
        device=device,
        num_classes=num_classes,
        amp=config.amp,
        dist=dist,
        channels_last=config.channels_last,
    )
    record = {"epochs": top.epochs(), "val_loss": m.loss, "top1": m.top1, "top5": m.top5}
    if dist.main:
        outputs.write_json(top.out / "averaged.json", record)
    log(
        f"averaged.safetensors, the mean of epochs {', '.join(map(str, top.epochs()))}: "
        f"val loss {m.loss:.4f}, top1 {m.top1:.4f}"
    )
    return record


def _check_outputs(
    config: TrainConfig,
    head: Head,
    num_classes: int,
    out: Path,
    checks: list[tuple[str, dict[str, str]]],
) -> None:
    from ckptsurgery.models import build_model
    from ckptsurgery.train import outputs
    from ckptsurgery.train.heads import find_head, replace_head

    for name, expected in checks:
        fresh = build_model(config.model, config.model_args, device="meta").module
        replace_head(fresh, find_head(fresh, head.name), num_classes)
        fresh.to_empty(device="cpu")
        outputs.check_reload(out / name, fresh, expected)


def _silent(message: str) -> None:
    pass
