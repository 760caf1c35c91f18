"""What a state dict is, and how the one a user means is found inside a loaded checkpoint.

A *state dict* is a non-empty mapping whose keys are all ``str`` and whose values are all
tensors. Training checkpoints nest it (``{"epoch": 90, "state_dict": {...}, "optimizer": ...}``),
sometimes twice (``{"model": {"student": {...}, "teacher": {...}}}``). We look at the loaded
object itself, then its entries, then their entries: exactly one candidate is used, several
are refused with the list so that the user can pick one with ``--key a/b``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptsurgery.errors import StateDictSelectionError

if TYPE_CHECKING:
    from torch import Tensor

StateDict = dict[str, "Tensor"]


def is_state_dict(obj: object) -> bool:
    """True for a non-empty mapping of ``str`` keys to tensors."""
    import torch

    if not isinstance(obj, Mapping) or not obj:
        return False
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


@dataclass(frozen=True)
class Selection:
    """The chosen state dict, where it was found, and what else the checkpoint holds."""

    state_dict: Mapping[str, Tensor]
    key: str | None  # slash-separated path, None when the loaded object is the state dict
    other_entries: dict[str, str]  # top-level entry name -> type name


def type_name(obj: object) -> str:
    cls = type(obj)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _other_entries(root: object, key: str | None) -> dict[str, str]:
    if not isinstance(root, Mapping) or key is None:
        return {}
    top = key.split("/", 1)[0]
    return {str(k): type_name(v) for k, v in root.items() if str(k) != top}


def find_candidates(root: object) -> list[str]:
    """Paths (``a`` or ``a/b``) of the nested state dicts, top level and one level below."""
    found: list[str] = []
    if not isinstance(root, Mapping):
        return found
    for k, v in root.items():
        if not isinstance(k, str):
            continue
        if is_state_dict(v):
            found.append(k)
        elif isinstance(v, Mapping):
            found.extend(
                f"{k}/{k2}" for k2, v2 in v.items() if isinstance(k2, str) and is_state_dict(v2)
            )
    return found


def select_state_dict(root: Any, key: str | None, *, source: str) -> Selection:
    """Pick the state dict inside ``root``: the one at ``key``, else the only candidate."""
    if key:
        node = root
        walked: list[str] = []
        for part in key.strip("/").split("/"):
            if not isinstance(node, Mapping):
                raise StateDictSelectionError(
                    f"{source}: --key {key!r}: {'/'.join(walked) or 'the checkpoint'} is a "
                    f"{type_name(node)}, not a mapping"
                )
            if part not in node:
                choices = ", ".join(repr(str(k)) for k in list(node)[:20])
                where = "/".join(walked) or "the top level"
                raise StateDictSelectionError(
                    f"{source}: --key {key!r}: no entry {part!r} at {where}; it has {choices}"
                )
            node = node[part]
            walked.append(part)
        if not is_state_dict(node):
            raise StateDictSelectionError(
                f"{source}: --key {key!r} is a {type_name(node)}, not a state dict "
                "(a mapping of str keys to tensors)" + _bad_entry_hint(node)
            )
        path = "/".join(walked)
        return Selection(node, path, _other_entries(root, path))
    # An empty file is the state dict of a model without parameters (as an empty safetensors
    # file is); nested empty mappings (an optimizer's fresh "state") are never candidates.
    if is_state_dict(root) or (isinstance(root, Mapping) and not root):
        return Selection(root, None, {})
    candidates = find_candidates(root)
    if len(candidates) == 1:
        return Selection(
            _walk(root, candidates[0]), candidates[0], _other_entries(root, candidates[0])
        )
    if not candidates:
        what = (
            "entries " + ", ".join(repr(str(k)) for k in list(root)[:20])
            if isinstance(root, Mapping)
            else f"a {type_name(root)}"
        )
        raise StateDictSelectionError(
            f"{source}: no state dict found (looked at the top level and one level below; "
            f"it holds {what}); pass --key PATH to point at one"
        )
    listing = ", ".join(candidates)
    raise StateDictSelectionError(
        f"{source}: several state dicts found ({listing}); choose one with --key, "
        f"e.g. --key {candidates[0]}",
        candidates=tuple(candidates),
    )


def _walk(root: Any, path: str) -> Any:
    node = root
    for part in path.split("/"):
        node = node[part]
    return node


def _bad_entry_hint(node: object) -> str:
    """Say which entry keeps a mapping from being a state dict (a non-str key, a non-tensor)."""
    import torch

    if not isinstance(node, Mapping):
        return ""
    for k, v in node.items():
        if not isinstance(k, str):
            return f"; key {k!r} is a {type_name(k)}, not a str"
        if not isinstance(v, torch.Tensor) and not isinstance(v, Mapping):
            return f"; entry {k!r} is a {type_name(v)}, not a tensor"
    return ""
