"""Optimizer parameter groups, built by one rule from parameter *names*, and checked.

The rule (``mode`` decides what trains; the head is a :class:`~ckptsurgery.train.heads.Head`):

- ``linear-probe``: one group ``head`` at ``lr``; every other parameter gets
  ``requires_grad=False`` and is in no group;
- ``full``: one group ``all`` at ``lr``, every parameter;
- ``discriminative``: ``backbone`` at ``lr`` and ``head`` at ``lr * head_lr_mult``.

With ``layer_decay`` (MAE/BEiT fine-tuning; ``full`` and ``discriminative``), the backbone is
split by depth: the stem is layer 0, block *i* (ResNet ``layerI``, torchvision ViT
``encoder.layers.encoder_layer_I``, timm ``blocks.I``) is layer *i* + 1 counting from 1, and
what comes after the last block (final norm) is layer L + 1. Layer *k* trains at
``lr * layer_decay ** (L + 1 - k)``; groups are ``backbone.K``.

Every group has the same ``weight_decay`` (by default as d2l applies it: to every parameter).
With ``decay_norm_bias=False`` (``--no-decay-norm-bias``, the timm/MAE/BEiT convention) each
group is split by name: the parameters of normalisation layers (BatchNorm, LayerNorm,
GroupNorm, ...) and every ``bias`` go to ``<group>.no_decay``, at the group's lr with weight
decay 0. The groups carry their ``name``; :func:`check_groups` verifies them before step 1 and
:func:`group_table` prints them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptsurgery.train.errors import GroupCheckError, TrainError
from ckptsurgery.train.heads import Head, is_head_key

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ckptsurgery.train.config import TrainConfig

__all__ = [
    "GroupSpec",
    "build_optimizer",
    "check_groups",
    "group_rows",
    "group_table",
    "layer_ids",
    "no_decay_names",
    "plan_groups",
    "set_trainable",
]

# Block names of the backbones --layer-decay knows: (pattern, offset added to the index).
_BLOCK_PATTERNS = (
    (re.compile(r"^layer(\d+)\."), 0),  # torchvision ResNet: layer1..layer4
    (re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\."), 1),  # torchvision ViT
    (re.compile(r"^blocks\.(\d+)\."), 1),  # timm ViT, DeiT, BEiT
)


@dataclass(frozen=True)
class GroupSpec:
    """One optimizer parameter group: its name, its parameters' names, lr and weight decay."""

    name: str
    params: tuple[str, ...]
    lr: float
    weight_decay: float


def set_trainable(model: nn.Module, head: Head, mode: str) -> list[str]:
    """Set ``requires_grad`` for ``mode`` and return the trainable parameter names.

    ``linear-probe``: the head's parameters only; otherwise every parameter (also those the
    model built frozen: the mode, not the factory, decides what trains).
    """
    trainable = []
    for name, param in model.named_parameters():
        train = mode != "linear-probe" or is_head_key(name, head)
        param.requires_grad_(train)
        if train:
            trainable.append(name)
    if not trainable:
        raise TrainError(f"{mode}: no parameter to train (the head {head.name} has none?)")
    return trainable


def plan_groups(model: nn.Module, head: Head, config: TrainConfig) -> list[GroupSpec]:
    """The parameter groups of ``config.mode``, by name (see the module docstring)."""
    groups = _plan_groups(model, head, config)
    if config.decay_norm_bias:
        return groups
    exempt = no_decay_names(model)
    split: list[GroupSpec] = []
    for g in groups:
        decay = tuple(n for n in g.params if n not in exempt)
        no_decay = tuple(n for n in g.params if n in exempt)
        if decay:
            split.append(GroupSpec(g.name, decay, g.lr, g.weight_decay))
        if no_decay:
            split.append(GroupSpec(f"{g.name}.no_decay", no_decay, g.lr, 0.0))
    return split


def no_decay_names(model: nn.Module) -> frozenset[str]:
    """The parameters ``--no-decay-norm-bias`` exempts: norm layers' and biases (``*_bias`` too)."""
    from torch import nn
    from torch.nn.modules.batchnorm import _NormBase

    norms = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
    out = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        # By type, and by name for the norms of other libraries (timm's LayerNorm2d,
        # BatchNormAct2d).
        is_norm = isinstance(module, norms) or "Norm" in type(module).__name__
        for name, _ in module.named_parameters(recurse=False):
            if is_norm or name == "bias" or name.endswith("_bias"):  # MHA in_proj_bias
                out.add(prefix + name)
    return frozenset(out)


def _plan_groups(model: nn.Module, head: Head, config: TrainConfig) -> list[GroupSpec]:
    names = [n for n, _ in model.named_parameters()]
    head_names = tuple(n for n in names if is_head_key(n, head))
    backbone = [n for n in names if not is_head_key(n, head)]
    lr, wd = config.lr, config.weight_decay
    if config.mode == "linear-probe":
        return [GroupSpec("head", head_names, lr, wd)]
    head_lr = lr * config.head_lr_mult if config.mode == "discriminative" else lr
    if config.layer_decay is None:
        if config.mode == "full":
            return [GroupSpec("all", tuple(names), lr, wd)]
        return [
            GroupSpec("backbone", tuple(backbone), lr, wd),
            GroupSpec("head", head_names, head_lr, wd),
        ]
    ids = layer_ids(backbone)
    deepest = max(ids.values())
    by_layer: dict[int, list[str]] = {}
    for n in backbone:
        by_layer.setdefault(ids[n], []).append(n)
    groups = [
        GroupSpec(f"backbone.{k}", tuple(by_layer[k]), lr * config.layer_decay ** (deepest - k), wd)
        for k in sorted(by_layer)
    ]
    return [*groups, GroupSpec("head", head_names, head_lr, wd)]


def layer_ids(names: Sequence[str]) -> dict[str, int]:
    """Depth of each backbone parameter for layer-wise lr decay (module docstring).

    Raises :class:`TrainError` when no known block structure is found.
    """
    block: dict[str, int] = {}
    for name in names:
        for pattern, offset in _BLOCK_PATTERNS:
            m = pattern.match(name)
            if m:
                block[name] = int(m.group(1)) + offset
                break
    if not block:
        raise TrainError(
            "--layer-decay knows ResNet stages (layer1..layer4) and ViT blocks "
            "(encoder.layers.encoder_layer_N, blocks.N); this model has neither"
        )
    last = max(block.values())
    ids: dict[str, int] = {}
    seen_block = False
    for name in names:
        if name in block:
            seen_block = True
            ids[name] = block[name]
        else:
            # The stem comes before the first block; final norms after the last.
            ids[name] = last + 1 if seen_block else 0
    return ids


def build_optimizer(
    model: nn.Module, groups: Sequence[GroupSpec], config: TrainConfig
) -> torch.optim.Optimizer:
    """SGD (with ``momentum``) or AdamW over ``groups``; each group keeps its ``name``."""
    import torch

    params = dict(model.named_parameters())
    param_groups: list[dict[str, Any]] = [
        {
            "name": g.name,
            "params": [params[n] for n in g.params],
            "lr": g.lr,
            "weight_decay": g.weight_decay,
        }
        for g in groups
        if g.params
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(param_groups, lr=config.lr)


def check_groups(optimizer: torch.optim.Optimizer, model: nn.Module, head: Head, mode: str) -> None:
    """The checks made before step 1; raises :class:`GroupCheckError` when one fails.

    No parameter is in two groups; the optimizer holds exactly the parameters with
    ``requires_grad``; in ``linear-probe`` mode those are exactly the head's.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[int, str] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names.get(id(p), "<not a parameter of the model>")
            if id(p) in seen:
                raise GroupCheckError(
                    f"{name} is in two optimizer groups ({seen[id(p)]} and {group['name']})"
                )
            seen[id(p)] = group["name"]
    in_optimizer = {names.get(i, "<not a parameter of the model>") for i in seen}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if in_optimizer != trainable:
        extra = sorted(in_optimizer - trainable)[:3]
        left_out = sorted(trainable - in_optimizer)[:3]
        raise GroupCheckError(
            "the optimizer does not hold exactly the trainable parameters "
            f"(in the optimizer but frozen: {extra or 'none'}; trainable but in no group: "
            f"{left_out or 'none'})"
        )
    if mode == "linear-probe":
        head_params = {n for n in names.values() if is_head_key(n, head)}
        if trainable != head_params:
            raise GroupCheckError(
                f"linear-probe: the trainable parameters {sorted(trainable)[:4]} are not "
                f"exactly the head's {sorted(head_params)}"
            )


def group_rows(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """One row per group: name, tensors, parameters, lr, weight decay."""
    return [
        {
            "group": g["name"],
            "tensors": len(g["params"]),
            "parameters": sum(p.numel() for p in g["params"]),
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
        }
        for g in optimizer.param_groups
    ]


def group_table(optimizer: torch.optim.Optimizer, *, fmt: str = "simple") -> str:
    from ckptsurgery.render.tables import table

    rows = group_rows(optimizer)
    cells = [
        (
            r["group"],
            f"{r['tensors']:,}",
            f"{r['parameters']:,}",
            f"{r['lr']:.3g}",
            f"{r['weight_decay']:.3g}",
        )
        for r in rows
    ]
    total = sum(r["parameters"] for r in rows)
    cells.append(("total", f"{sum(r['tensors'] for r in rows):,}", f"{total:,}", "", ""))
    return table(cells, ("group", "tensors", "parameters", "lr", "weight decay"), fmt=fmt)
