"""What a state dict is, and how the one a user means is found inside a loaded checkpoint.

A *state dict* is a non-empty mapping whose keys are all ``str`` and whose values are all
tensors. Training checkpoints nest it (``{"epoch": 90, "state_dict": {...}, "optimizer": ...}``),
sometimes twice (``{"model": {"student": {...}, "teacher": {...}}}``). We look at the loaded
object itself, then its entries, then their entries: exactly one candidate is used, several
are refused with the list so that the user can pick one with ``--key a/b``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptsurgery.errors import StateDictSelectionError

if TYPE_CHECKING:
    from torch import Tensor

StateDict = dict[str, "Tensor"]


@dataclass(frozen=True)
class Selection:
    """The chosen state dict, where it was found, and what else the checkpoint holds."""

    state_dict: Mapping[str, Tensor]
    key: str | None  # slash-separated path, None when the loaded object is the state dict
    other_entries: dict[str, str]  # top-level entry name -> type name


def type_name(obj: object) -> str:
    cls = type(obj)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


class Selector:
    """The search, for one kind of tensor: ``torch.Tensor`` in a loaded checkpoint, or the
    stand-ins of a pickle read without torch (:mod:`ckptsurgery.io.torchzip`,
    :mod:`ckptsurgery.io.dcp`), which name their types with ``type_name``."""

    def __init__(self, tensor_type: type, type_name: Callable[[object], str] = type_name) -> None:
        self.tensor_type = tensor_type
        self.type_name = type_name

    def is_state_dict(self, obj: object) -> bool:
        if not isinstance(obj, Mapping) or not obj:
            return False
        return all(isinstance(k, str) and isinstance(v, self.tensor_type) for k, v in obj.items())

    def candidates(self, root: object) -> list[str]:
        return ["/".join(path) for path in self._candidate_paths(root)]

    def _candidate_paths(self, root: object) -> list[tuple[str, ...]]:
        # as key tuples: a key may hold "/" itself ({"model/ema": {...}})
        found: list[tuple[str, ...]] = []
        if not isinstance(root, Mapping):
            return found
        for k, v in root.items():
            if not isinstance(k, str):
                continue
            if self.is_state_dict(v):
                found.append((k,))
            elif isinstance(v, Mapping):
                found.extend(
                    (k, k2)
                    for k2, v2 in v.items()
                    if isinstance(k2, str) and self.is_state_dict(v2)
                )
        return found

    def select(
        self, root: Any, key: str | None, *, source: str
    ) -> tuple[Any, str | None, dict[str, str]]:
        """(state dict, its key path, other top-level entries): see :func:`select_state_dict`."""
        name = self.type_name
        if key:
            node = root
            walked: list[str] = []
            for part in key.strip("/").split("/"):
                if not isinstance(node, Mapping):
                    raise StateDictSelectionError(
                        f"{source}: --key {key!r}: {'/'.join(walked) or 'the checkpoint'} is a "
                        f"{name(node)}, not a mapping"
                    )
                if part not in node:
                    choices = ", ".join(repr(str(k)) for k in list(node)[:20])
                    where = "/".join(walked) or "the top level"
                    raise StateDictSelectionError(
                        f"{source}: --key {key!r}: no entry {part!r} at {where}; it has {choices}"
                    )
                node = node[part]
                walked.append(part)
            if not self.is_state_dict(node):
                raise StateDictSelectionError(
                    f"{source}: --key {key!r} is a {name(node)}, not a state dict "
                    "(a mapping of str keys to tensors)" + self._bad_entry_hint(node)
                )
            path = "/".join(walked)
            return node, path, self._other_entries(root, walked[0] if walked else None)
        # An empty file is the state dict of a model without parameters (as an empty
        # safetensors file is); nested empty mappings (an optimizer's fresh "state") are never
        # candidates.
        if self.is_state_dict(root) or (isinstance(root, Mapping) and not root):
            return root, None, {}
        paths = self._candidate_paths(root)
        candidates = ["/".join(path) for path in paths]
        if len(candidates) == 1:
            node = root
            for part in paths[0]:
                node = node[part]
            return node, candidates[0], self._other_entries(root, paths[0][0])
        if not candidates:
            what = (
                "entries " + ", ".join(repr(str(k)) for k in list(root)[:20])
                if isinstance(root, Mapping)
                else f"a {name(root)}"
            )
            raise StateDictSelectionError(
                f"{source}: no state dict found (looked at the top level and one level below; "
                f"it holds {what}); pass --key PATH to point at one"
            )
        from ckptsurgery.candidates import preferred

        listing = ", ".join(candidates)
        pick = preferred(candidates)
        hint = (
            f"e.g. --key {pick} (the EMA / teacher weights, what fine-tuning usually starts from)"
            if pick is not None
            else f"e.g. --key {candidates[0]}"
        )
        raise StateDictSelectionError(
            f"{source}: several state dicts found ({listing}); choose one with --key, {hint}",
            candidates=tuple(candidates),
        )

    def _other_entries(self, root: object, top: str | None) -> dict[str, str]:
        """The top-level entries besides ``top``, the one that leads to the state dict."""
        if not isinstance(root, Mapping) or top is None:
            return {}
        return {str(k): self.type_name(v) for k, v in root.items() if str(k) != top}

    def _bad_entry_hint(self, node: object) -> str:
        """Which entry keeps a mapping from being a state dict (a non-str key, a non-tensor)."""
        if not isinstance(node, Mapping):
            return ""
        for k, v in node.items():
            if not isinstance(k, str):
                return f"; key {k!r} is a {self.type_name(k)}, not a str"
            if not isinstance(v, self.tensor_type) and not isinstance(v, Mapping):
                return f"; entry {k!r} is a {self.type_name(v)}, not a tensor"
        return ""


def _torch_selector() -> Selector:
    import torch

    return Selector(torch.Tensor)


def is_state_dict(obj: object) -> bool:
    """True for a non-empty mapping of ``str`` keys to tensors."""
    return _torch_selector().is_state_dict(obj)


def find_candidates(root: object) -> list[str]:
    """Paths (``a`` or ``a/b``) of the nested state dicts, top level and one level below."""
    return _torch_selector().candidates(root)


def select_state_dict(root: Any, key: str | None, *, source: str) -> Selection:
    """Pick the state dict inside ``root``: the one at ``key``, else the only candidate."""
    return Selection(*_torch_selector().select(root, key, source=source))
