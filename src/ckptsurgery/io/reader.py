"""Open a checkpoint: names, shapes and dtypes first, tensor data one tensor at a time.

:func:`open_checkpoint` returns a :class:`Checkpoint` whose ``infos`` describe every tensor
before any tensor byte is read, and whose ``raw_bytes`` / ``write_data`` / ``tensor`` fetch one
tensor at a time. Every command goes through it. The sources:

- safetensors: the validated header (:class:`SafetensorsCheckpoint`);
- torch zip: the archive's pickle read without torch (:mod:`ckptsurgery.io.torchzip`), or
  ``torch.load(weights_only=True, mmap=True)`` when it needs more (:class:`TorchCheckpoint`);
- legacy torch files: ``torch.load(weights_only=True)``;
- sharded checkpoints, an index and its shards (:mod:`ckptsurgery.io.sharded`);
- torch.distributed.checkpoint folders (:mod:`ckptsurgery.io.dcp`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ckptsurgery._types import PathLike
from ckptsurgery.errors import FormatError, StateDictSelectionError
from ckptsurgery.io import safetensors_format as stf
from ckptsurgery.io.base import Checkpoint as Checkpoint  # re-exported: callers import it here
from ckptsurgery.io.detect import (
    SAFETENSORS,
    SHARDED_INDEX,
    TORCH_LEGACY,
    TORCH_ZIP,
    check_source_path,
    detect_format,
)
from ckptsurgery.io.dtypes import info_of, torch_dtype
from ckptsurgery.io.streams import copy_range, crc_of_range, crcs_of_spans, read_range

if TYPE_CHECKING:
    import torch


# Written by ckptsurgery into safetensors metadata: tied names -> the name actually stored.
ALIASES_KEY = "ckptsurgery.aliases"


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.format = SAFETENSORS
        self.other_entries = {}
        self._f: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            header = stf.read_header(self._f, os.fstat(self._f.fileno()).st_size, source=str(path))
            self.metadata = header.metadata
            self._entries = header.entries
            self.aliases = _parse_aliases(header.metadata, header.entries, source=str(path))
        except BaseException:
            self._f.close()
            raise
        self.infos = {}
        by_canonical: dict[str, list[str]] = {}
        for alias, canon in self.aliases.items():
            by_canonical.setdefault(canon, []).append(alias)
        for name, entry in self._entries.items():
            self.infos[name] = entry.info
            for alias in by_canonical.get(name, ()):
                self.infos[alias] = entry.info

    def _what(self, name: str) -> str:
        return f"{self.path}: the data of {name!r}"

    def raw_bytes(self, name: str) -> bytes | memoryview:
        entry = self._entries[self.canonical(name)]
        return memoryview(
            read_range(self._f, entry.begin, entry.end - entry.begin, what=self._what(name))
        )

    def write_data(self, name: str, f: BinaryIO) -> int:
        # A rename changes no tensor byte: copy the byte range through a bounded buffer
        # (a plain read/write loop keeps pace with cp; copy_file_range from an offset did not).
        entry = self._entries[self.canonical(name)]
        copy_range(self._f, entry.begin, entry.end - entry.begin, f, what=self._what(name))
        return entry.end - entry.begin

    def data_crc(self, name: str) -> int:
        entry = self._entries[self.canonical(name)]
        return crc_of_range(self._f, entry.begin, entry.end - entry.begin, what=self._what(name))

    def data_crcs(self, names: Iterable[str]) -> dict[str, int]:
        spans = []
        for name in names:
            entry = self._entries[self.canonical(name)]
            spans.append((name, entry.begin, entry.end - entry.begin))
        return crcs_of_spans(self._f, spans, what=str(self.path))

    def tensor(self, name: str) -> torch.Tensor:
        import torch

        info = self.infos[name]
        dtype = torch_dtype(info.dtype)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        data = self.raw_bytes(name)
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(info.shape)

    def close(self) -> None:
        self._f.close()


def _parse_aliases(
    metadata: dict[str, str], entries: dict[str, stf.Entry], *, source: str
) -> dict[str, str]:
    raw = metadata.get(ALIASES_KEY)
    if not raw:
        return {}
    try:
        aliases = json.loads(raw)
    except json.JSONDecodeError:
        aliases = None
    if not isinstance(aliases, dict) or not all(
        isinstance(a, str) and isinstance(c, str) and c in entries and a not in entries
        for a, c in aliases.items()
    ):
        raise FormatError(f"{source}: metadata {ALIASES_KEY!r} does not name stored tensors")
    return aliases


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


class TorchCheckpoint(TensorDictSource):
    def __init__(
        self,
        path: Path,
        fmt: str,
        *,
        key: str | None,
        allow_globals: tuple[str, ...],
        unsafe_pickle: bool,
    ) -> None:
        from ckptsurgery.io.torchfile import load_torch
        from ckptsurgery.state_dict import select_state_dict

        self.path = path
        self.format = fmt
        self.metadata = {}
        obj = load_torch(path, fmt, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle)
        sel = select_state_dict(obj, key, source=str(path))
        self.key = sel.key
        self.other_entries = sel.other_entries
        self._init_tensors(sel.state_dict, source=str(path))


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


def open_checkpoint(
    path: PathLike,
    *,
    key: str | None = None,
    allow_globals: tuple[str, ...] | list[str] = (),
    unsafe_pickle: bool = False,
) -> Checkpoint:
    """Open ``path`` (format recognised from its content) and select its state dict.

    ``path`` is a checkpoint file, a sharded checkpoint (its ``*.index.json`` or the folder
    holding it) or a torch.distributed.checkpoint folder.
    """
    p = Path(path)
    if p.is_dir():
        from ckptsurgery.io.sharded import open_folder

        return open_folder(
            p, key=key, allow_globals=tuple(allow_globals), unsafe_pickle=unsafe_pickle
        )
    p = check_source_path(p)
    fmt = detect_format(p)
    if fmt == SHARDED_INDEX:
        from ckptsurgery.io.sharded import ShardedCheckpoint

        return ShardedCheckpoint(
            p, key=key, allow_globals=tuple(allow_globals), unsafe_pickle=unsafe_pickle
        )
    return open_file(
        p, fmt, key=key, allow_globals=tuple(allow_globals), unsafe_pickle=unsafe_pickle
    )


def open_file(
    p: Path, fmt: str, *, key: str | None, allow_globals: tuple[str, ...], unsafe_pickle: bool
) -> Checkpoint:
    """One checkpoint file of a known format (checked by :func:`check_source_path`)."""
    if fmt == SAFETENSORS:
        if key:
            # A --key mistake, like a --key that leads nowhere in a torch file.
            raise StateDictSelectionError(
                f"{str(p)!r} is a safetensors file, which holds one flat state dict; "
                "--key does not apply to it (leave it out)"
            )
        return SafetensorsCheckpoint(p)
    if fmt not in (TORCH_ZIP, TORCH_LEGACY):
        raise FormatError(f"{str(p)!r} is a {fmt}, not a checkpoint file")
    if fmt == TORCH_ZIP and not unsafe_pickle and not allow_globals:
        # Most torch files hold only tensors and plain containers: their pickle is read
        # without torch, and tensor bytes are copied straight from the archive. A file that
        # needs more (or a user who trusts more) goes through torch's weights-only unpickler.
        from ckptsurgery.io.torchpickle import Unsupported
        from ckptsurgery.io.torchzip import TorchZipCheckpoint

        try:
            return TorchZipCheckpoint(p, key=key)
        except Unsupported:
            pass  # more than the stand-ins know: torch's weights-only unpickler decides
    return TorchCheckpoint(
        p, fmt, key=key, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
    )


def identity_file(path: PathLike) -> Path:
    """The file whose bytes identify a source (for provenance): the file itself, or the
    index of a sharded folder, or a DCP folder's ``.metadata``."""
    p = Path(path)
    if not p.is_dir():
        return p
    from ckptsurgery.io.sharded import INDEX_NAMES, SINGLE_NAMES

    if (p / ".metadata").is_file():
        return p / ".metadata"
    for name in (*INDEX_NAMES, *SINGLE_NAMES):
        if (p / name).is_file():
            return p / name
    indexes = sorted(p.glob("*.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    raise FormatError(f"{str(p)!r} is a folder without a checkpoint")
