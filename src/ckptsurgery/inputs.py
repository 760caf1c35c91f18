"""What the library's verbs take as a checkpoint: a path, an open Checkpoint or a state dict.

:func:`checkpoint_input` opens a path (header only) for the length of a ``with`` block and
applies :class:`~ckptsurgery.rules.Rules` to whichever it was given, without reading a tensor:
a Checkpoint is renamed as a view of its header, a state dict as a new dict.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptsurgery.errors import CheckpointError, FormatError
from ckptsurgery.io.base import Checkpoint
from ckptsurgery.io.dtypes import TensorInfo, dtype_name, info_of
from ckptsurgery.models import BuiltModel
from ckptsurgery.rules import Rules

if TYPE_CHECKING:
    import torch

__all__ = ["checkpoint_input"]


@contextmanager
def checkpoint_input(
    obj: Any, *, key: str | None = None, rules: Rules | None = None
) -> Iterator[tuple[Any, list[str]]]:
    """``obj`` ready to match or load, and the rules (as CLI flags) that matched no key.

    A path is opened (``key`` selects a nested state dict) and closed at the end of the block;
    anything else that is not a path is passed through (renamed when ``rules`` are given), for
    the caller to check.
    """
    opened: Checkpoint | None = None
    if isinstance(obj, str | os.PathLike):
        from ckptsurgery.io.reader import open_checkpoint

        obj = opened = open_checkpoint(obj, key=key)
    elif key is not None:
        raise TypeError("key= selects a state dict inside a file; pass it with a path")
    try:
        unused: list[str] = []
        if rules is not None and isinstance(obj, Checkpoint | Mapping):
            plan = rules.plan(obj.infos if isinstance(obj, Checkpoint) else obj)
            unused = plan.unused_rules
            if isinstance(obj, Checkpoint):
                from ckptsurgery.io.renamed import RenamedCheckpoint

                obj = RenamedCheckpoint(obj, plan.renames)
            else:
                obj = plan.apply(obj)
        yield obj, unused
    finally:
        if opened is not None:
            opened.close()


# --- the two sides of a match ---------------------------------------------------------------


@dataclass(frozen=True)
class _Side:
    infos: dict[str, TensorInfo]
    group: dict[str, str]  # key -> first key of its tie group (itself when untied)


def _side(obj: object, *, what: str) -> _Side:
    if isinstance(obj, BuiltModel):
        obj = obj.module
    if isinstance(obj, Checkpoint):
        infos = dict(obj.infos)
        return _Side(infos, {k: obj.aliases.get(k, k) for k in infos})
    if isinstance(obj, Mapping):
        return _mapping_side(obj, what=what)
    from torch import nn
    from torch.nn.parameter import is_lazy

    if isinstance(obj, nn.Module):
        # keep_vars: the Parameter objects themselves, so that ties show even on meta.
        state = obj.state_dict(keep_vars=True)
        lazy = [k for k, v in state.items() if is_lazy(v)]
        if lazy:
            raise CheckpointError(
                f"the model's parameters {', '.join(lazy[:3])}{', ...' if len(lazy) > 3 else ''} "
                "are lazy and have no shape yet; "
                "run one forward pass (or build the model with explicit sizes) first"
            )
        return _Side({k: info_of(v) for k, v in state.items()}, _tie_groups(state))
    raise TypeError(
        f"{what} must be a state dict, a mapping of TensorInfo, a Checkpoint or an nn.Module; "
        f"got {type(obj).__name__}"
    )


def _mapping_side(mapping: Mapping[Any, Any], *, what: str) -> _Side:
    infos: dict[str, TensorInfo] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise FormatError(f"{what}: state dict keys are strings; found {key!r}")
        if isinstance(value, TensorInfo):
            infos[key] = value
            continue
        import torch

        if not isinstance(value, torch.Tensor):
            raise FormatError(
                f"{what}: a state dict maps keys to tensors (or TensorInfo); "
                f"{key!r} maps to a {type(value).__name__}"
            )
        infos[key] = info_of(value)
        tensors[key] = value
    group = {k: k for k in infos}
    group.update(_tie_groups(tensors))
    return _Side(infos, group)


def _tie_groups(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Key -> first key holding the same tensor: the same object (meta models included, with
    ``state_dict(keep_vars=True)``) or the same view of one storage (real tensors)."""
    first_by_ident: dict[object, str] = {}
    group: dict[str, str] = {}
    for key, t in tensors.items():
        idents: list[object] = [("object", id(t))]
        if not t.is_meta and t.numel() > 0:
            idents.append(
                (
                    "view",
                    t.device.type,
                    t.untyped_storage().data_ptr(),
                    t.storage_offset(),
                    tuple(t.shape),
                    t.stride(),
                    dtype_name(t.dtype),
                )
            )
        head = next((first_by_ident[i] for i in idents if i in first_by_ident), key)
        group[key] = head
        for i in idents:
            first_by_ident.setdefault(i, head)
    return group
