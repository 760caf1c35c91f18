"""Sharded checkpoints in the Hugging Face layout: an index, and shard files beside it.

``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``) reads::

    {"metadata": {"total_size": 28966928384},
     "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors", ...}}

:class:`ShardedCheckpoint` reads one as a single checkpoint: each shard is opened header-only
(safetensors) or through its pickle alone (torch zip), and tensors are fetched from the shard
that holds them, one at a time. The index is validated first: every shard name is a single
path component inside the index's folder (a symlink there, as in the Hugging Face cache, is
fine), every shard exists, every key of the index is in its shard and no key is in two shards.

:func:`write_sharded` writes the layout ``transformers`` writes: safetensors shards named
``model-00001-of-0000N.safetensors`` of at most ``max_shard_size`` bytes of tensor data each
(a bigger tensor gets a shard of its own) and the index, into a new folder that takes its
name atomically.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ckptsurgery.errors import FormatError, OutputError, SourceError, StateDictSelectionError
from ckptsurgery.io.base import Checkpoint, RecordCheck
from ckptsurgery.io.detect import (
    DCP,
    SHARDED_INDEX,
    check_source_path,
    detect_format,
    unsafe_file_name,
)
from ckptsurgery.io.dtypes import TensorInfo
from ckptsurgery.io.files import open_file
from ckptsurgery.io.safetensors_format import ALIASES_KEY

if TYPE_CHECKING:
    import torch

MAX_INDEX = 100 * 1024 * 1024  # bytes of JSON an index may take (a 1T-parameter index is ~50 MB)
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"it names {k!r} twice")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise FormatError(f"it holds {name}, which JSON does not allow")


def read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of an index file, validated: key -> shard file name."""

    def bad(msg: str) -> FormatError:
        return FormatError(f"{str(path)!r}: not a valid sharded checkpoint index: {msg}")

    size = path.stat().st_size
    if size > MAX_INDEX:
        raise bad(f"{size} bytes, over the {MAX_INDEX}-byte limit for an index")
    raw = path.read_bytes()
    try:
        doc = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant
        )
    except FormatError as e:
        raise bad(str(e)) from None
    except UnicodeDecodeError as e:
        raise bad(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise bad(f"not JSON ({e.msg} at byte {e.pos})") from None
    except (ValueError, RecursionError) as e:
        raise bad(f"cannot be parsed ({type(e).__name__})") from None
    if not isinstance(doc, dict) or "weight_map" not in doc:
        raise bad('expected a JSON object with a "weight_map"')
    weight_map = doc["weight_map"]
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise bad('"weight_map" must map tensor names to shard file names')
    for shard in dict.fromkeys(weight_map.values()):
        problem = unsafe_file_name(shard)
        if problem:
            raise bad(f"shard name {shard!r} {problem}; it must be a file name in the folder")
    return weight_map


class ShardedCheckpoint(Checkpoint):
    """The shards of an index seen as one checkpoint; tensors fetched from their shard."""

    def __init__(
        self,
        path: Path,
        *,
        key: str | None,
        allow_globals: tuple[str, ...] = (),
        unsafe_pickle: bool = False,
    ) -> None:
        if key:
            raise StateDictSelectionError(
                f"{str(path)!r} is a sharded checkpoint, which holds one flat state dict; "
                "--key does not apply to it (leave it out)"
            )
        self.path = path
        self.other_entries = {}
        weight_map = read_index(path)
        folder = path.parent
        self._stack = ExitStack()
        self.shards: dict[str, Checkpoint] = {}
        self._where: dict[str, Checkpoint] = {}
        self.infos = {}
        self.aliases = {}
        try:
            for shard in sorted(set(weight_map.values())):  # model-00001-of-... first
                shard_path = folder / shard
                if not os.path.lexists(shard_path):
                    raise SourceError(
                        f"{str(path)!r}: shard {shard!r} listed in the index is missing from "
                        f"{str(folder)!r}"
                    )
                shard_path = check_source_path(shard_path)
                fmt = detect_format(shard_path)
                if fmt in (SHARDED_INDEX, DCP):
                    raise FormatError(f"{str(path)!r}: shard {shard!r} is not a checkpoint file")
                opened = self._stack.enter_context(
                    open_file(
                        shard_path,
                        fmt,
                        key=None,
                        allow_globals=allow_globals,
                        unsafe_pickle=unsafe_pickle,
                    )
                )
                self.shards[shard] = opened
            self._index(weight_map)
        except BaseException:
            self._stack.close()
            raise
        formats = sorted({s.format for s in self.shards.values()})
        self.format = "sharded-" + "+".join(formats) if formats else "sharded"
        first = next(iter(self.shards.values()), None)
        self.metadata = dict(first.metadata) if first is not None else {}
        self.metadata.pop(ALIASES_KEY, None)

    def _index(self, weight_map: Mapping[str, str]) -> None:
        source = repr(str(self.path))
        holder: dict[str, str] = {}  # tensor name -> shard file that holds it
        for shard, ckpt in self.shards.items():
            for name in ckpt.infos:
                if name in holder:
                    raise FormatError(
                        f"{source}: tensor {name!r} is in two shards, {holder[name]!r} and "
                        f"{shard!r}"
                    )
                holder[name] = shard
        for name, shard in weight_map.items():
            if holder.get(name) != shard:
                where = f" (it is in {holder[name]!r})" if name in holder else ""
                raise FormatError(
                    f"{source}: the index puts {name!r} in shard {shard!r}, which does not "
                    f"hold it{where}"
                )
        for shard, ckpt in self.shards.items():
            for name, info in ckpt.infos.items():
                if name not in weight_map and name not in ckpt.aliases:
                    raise FormatError(
                        f"{source}: shard {shard!r} holds {name!r}, which the index does not "
                        "list; the index and its shards disagree"
                    )
                self.infos[name] = info
                self._where[name] = ckpt
                if name in ckpt.aliases:
                    self.aliases[name] = ckpt.aliases[name]

    def raw_bytes(self, name: str) -> bytes | memoryview:
        return self._where[name].raw_bytes(name)

    def bytes_view(self, name: str) -> bytes | memoryview:
        return self._where[name].bytes_view(name)

    def tensor_view(self, name: str) -> torch.Tensor:
        return self._where[name].tensor_view(name)

    def write_data(self, name: str, f: BinaryIO) -> int:
        return self._where[name].write_data(name, f)

    def record_crc(self, name: str) -> int | None:
        return self._where[name].record_crc(name)

    def data_crc(self, name: str) -> int:
        return self._where[name].data_crc(name)

    def data_crcs(self, names: Iterable[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for shard, part in self._by_shard(names):
            out.update(shard.data_crcs(part))
        return out

    def tensor(self, name: str) -> torch.Tensor:
        return self._where[name].tensor(name)

    def check_jobs(self, names: Iterable[str]) -> list[RecordCheck]:
        return [job for shard, part in self._by_shard(names) for job in shard.check_jobs(part)]

    def tapped_crcs(self, names: Iterable[str]) -> dict[str, Callable[[], int]]:
        out: dict[str, Callable[[], int]] = {}
        for shard, part in self._by_shard(names):
            out.update(shard.tapped_crcs(part))
        return out

    def _by_shard(self, names: Iterable[str]) -> list[tuple[Checkpoint, list[str]]]:
        by_shard: dict[int, tuple[Checkpoint, list[str]]] = {}
        for name in names:
            shard = self._where[name]
            by_shard.setdefault(id(shard), (shard, []))[1].append(name)
        return list(by_shard.values())

    def close(self) -> None:
        self._stack.close()


# --- writing --------------------------------------------------------------------------------

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5 * 10**9, ``"2GiB"`` -> 2 * 2**30, ``"500MB"``, ``"1048576"``: bytes.

    Decimal units (KB, MB, GB, TB) are powers of 1000 and binary ones (KiB, MiB, GiB, TiB)
    powers of 1024, as ``transformers`` reads ``max_shard_size``.
    """
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.fullmatch(text)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise OutputError(
                f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB, 2GiB or a "
                "number of bytes"
            )
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise OutputError(f"--max-shard-size {text!r}: the size must be positive")
    return value


def index_layout(out: Path) -> tuple[Path, str]:
    """(folder, index file name) of a sharded output given as a folder or an index path."""
    if out.name.endswith(".index.json"):
        if not out.name.endswith(".safetensors.index.json"):
            raise OutputError(
                f"{out.name!r}: a sharded safetensors index is named "
                "<name>.safetensors.index.json (e.g. model.safetensors.index.json)"
            )
        return out.parent, out.name
    return out, INDEX_NAMES[0]


def plan_shards(
    items: Sequence[tuple[str, TensorInfo]], max_shard_size: int
) -> list[list[tuple[str, TensorInfo]]]:
    """Split stored tensors into shards as huggingface_hub does: in order, a new shard when
    the next tensor would overflow this one, and a shard of its own for a tensor bigger than
    the limit. (The hub sets such a tensor's shard before the one being filled; here it
    closes that one first, so that reading the shards in turn gives the tensors' order.)"""
    shards: list[list[tuple[str, TensorInfo]]] = []
    current: list[tuple[str, TensorInfo]] = []
    size = 0
    for name, info in items:
        if current and size + info.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append((name, info))
        size += info.nbytes
    if current:
        shards.append(current)
    return shards


def shard_names(index_name: str, count: int) -> list[str]:
    stem = index_name.removesuffix(".safetensors.index.json")
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def index_json(weight_map: Mapping[str, str], total_size: int) -> bytes:
    """The index as transformers writes it: sorted keys, two-space indent, final newline."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(weight_map)}
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")
