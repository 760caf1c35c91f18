"""Tensors already in memory (a state dict) seen as a :class:`Checkpoint`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptsurgery.errors import FormatError
from ckptsurgery.io.base import Checkpoint
from ckptsurgery.io.dtypes import info_of

if TYPE_CHECKING:
    import torch


class TensorDictSource(Checkpoint):
    """A mapping of tensors already in memory, seen through the same interface."""

    def __init__(
        self, state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict"
    ) -> None:
        self.path = Path(source)
        self.format = "memory"
        self.metadata = {}
        self.other_entries = {}
        self._init_tensors(state_dict, source=source)

    def _init_tensors(self, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
        import torch

        self._tensors: dict[str, torch.Tensor] = {}
        self.infos = {}
        self.aliases = {}
        seen: dict[tuple[object, ...], str] = {}
        for name, t in state_dict.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise FormatError(
                    f"{source}: a state dict maps str keys to tensors; {name!r} maps to a "
                    f"{type(t).__name__}"
                )
            _check_plain_tensor(name, t, source=source)
            # A conjugate or negated view shares its base's memory but not its values: give it
            # memory of its own, so that it is neither tied to its base nor written as it.
            t = t.detach().resolve_conj().resolve_neg()
            self._tensors[name] = t
            self.infos[name] = info_of(t)
            # One storage, same view: a tied parameter (e.g. embeddings and lm_head).
            ident = _view_identity(t)
            if ident is not None and ident in seen:
                self.aliases[name] = seen[ident]
            elif ident is not None:
                seen[ident] = name

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def raw_bytes(self, name: str) -> bytes | memoryview:
        return tensor_bytes(self._tensors[name])

    def close(self) -> None:
        self._tensors.clear()


def _check_plain_tensor(name: str, t: torch.Tensor, *, source: str) -> None:
    import torch

    if t.layout != torch.strided:
        raise FormatError(
            f"{source}: tensor {name!r} is a {t.layout} tensor, which ckptsurgery does not "
            "handle; convert it with .to_dense() first"
        )
    if t.is_quantized:
        raise FormatError(
            f"{source}: tensor {name!r} is quantized ({t.dtype}), which ckptsurgery does not "
            "handle; dequantize it first"
        )
    if t.device.type == "meta":
        raise FormatError(f"{source}: tensor {name!r} is on the meta device and holds no data")


def _view_identity(t: torch.Tensor) -> tuple[object, ...] | None:
    if t.numel() == 0:
        return None  # empty tensors share nothing worth tying
    storage = t.untyped_storage()
    return (storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's element bytes in C order, without copying when it is already contiguous."""
    import torch

    flat = t.contiguous().reshape(-1).cpu()  # a state dict straight from a GPU model too
    if flat.numel() == 0:
        return memoryview(b"")
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array).cast("B")
