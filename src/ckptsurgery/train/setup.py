"""Everything a training run needs before step 1, built and checked: :func:`prepare`.

The model is built and seeded, its head found (printed) and replaced, the weights loaded
through the rules and the gate (the report printed), ``requires_grad`` set for the mode, and
the optimizer's groups built by name, checked and printed. Nothing is written; ``--dry-run``
stops after this. :mod:`ckptsurgery.train.loop` runs the epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptsurgery.train.config import TrainConfig
from ckptsurgery.train.heads import Head

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ckptsurgery.train.data import Splits
    from ckptsurgery.train.distributed import Dist
    from ckptsurgery.train.loading import LoadResult

__all__ = ["Setup", "prepare"]

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


def prepare(
    config: TrainConfig,
    *,
    log: Log,
    show: Log,
    dist: Dist | None = None,
    fmt: str = "simple",
) -> Setup:
    """Build the model, replace its head, load the weights, build and check the groups.

    Prints the head found and the loading report (``log``), and the group table (``show``, in
    the table format ``fmt``). Nothing is written. Under torchrun (``dist``) a CUDA device is the process's own GPU.
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
    local_rank = dist.local_rank if dist is not None and dist.enabled else None
    device = resolve_device(config.device, amp=config.amp, local_rank=local_rank)
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
        for rule in loaded.keys.unused_rules:
            log(f"note: {rule} matched no key")
        from ckptsurgery.plan.table import plan_summary, plan_table

        if config.dry_run:
            show(plan_table(loaded.plan, fmt=fmt))
        log(f"plan: {plan_summary(loaded.plan, verb='load')}")
        show(loaded.report.table(fmt=fmt))
        for key in loaded.dropped_head:
            log(f"dropped {key} from the checkpoint: its shape is the old head's")
        if loaded.loaded_head:
            log(
                f"the checkpoint's {head.name} fits the new head and is loaded "
                f"(drop it with --drop '{head.name}.*' to start from a fresh head)"
            )

    set_trainable(model, head, config.mode)
    model.to(device)
    if config.channels_last:  # 4-D weights (convolutions) in NHWC order, as the inputs
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, plan_groups(model, head, config), config)
    check_groups(optimizer, model, head, config.mode)
    show(group_table(optimizer, fmt=fmt))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        log(
            f"frozen: {len(frozen)} tensors, "
            f"{sum(p.numel() for p in model.parameters() if not p.requires_grad):,} parameters"
        )

    frozen_bn = frozen_batchnorms(model, head)
    reference = frozen_digests(model, head) if config.mode == "linear-probe" else {}
    return Setup(config, splits, model, head, loaded, optimizer, frozen_bn, reference, device)
