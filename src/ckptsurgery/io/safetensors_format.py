"""The safetensors layout, read and written by hand so that no path here needs torch.

A file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data
section. The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data section) plus an optional ``"__metadata__"`` of str -> str.
The reference reader is not a validator, so every rule of the format is checked here.
:class:`SafetensorsCheckpoint` reads a file through the validated header; only its
``tensor`` imports torch.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ckptsurgery.errors import FormatError, OutputError
from ckptsurgery.io.base import Checkpoint
from ckptsurgery.io.detect import SAFETENSORS
from ckptsurgery.io.dtypes import SAFETENSORS_DTYPES, TensorInfo, safetensors_code, torch_dtype
from ckptsurgery.io.streams import copy_range, crc_of_range, crcs_of_spans, read_range, tap_digest

if TYPE_CHECKING:
    import torch

MAX_HEADER = 100_000_000  # the reference implementation's own limit (bytes, inclusive)
ALIGN = 8  # the header is padded with spaces so that the data section starts 8-aligned


@dataclass(frozen=True)
class Entry:
    info: TensorInfo
    begin: int  # absolute file offset of the first byte
    end: int


@dataclass(frozen=True)
class Header:
    entries: dict[str, Entry]  # in the header's order (the writer's key order)
    metadata: dict[str, str]
    data_start: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # called for every object of the header: the common case stays in C
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise FormatError(f"the header names {k!r} twice")
            seen.add(k)
    return out


def _reject_constant(name: str) -> Any:
    raise FormatError(f"the header holds {name}, which JSON does not allow")


_U64 = 2**64  # shapes and offsets are u64 in the format (the library refuses larger ones)


def _is_int(x: object) -> bool:
    # bounded: a 5000-digit number cannot even be put in an error message
    return isinstance(x, int) and not isinstance(x, bool) and -_U64 < x < _U64


def read_header(f: BinaryIO, file_size: int, *, source: str) -> Header:
    """Parse and validate a safetensors header; no tensor byte is read."""

    def bad(msg: str) -> FormatError:
        return FormatError(f"{source!r}: not a valid safetensors file: {msg}")

    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise bad(f"the file is {file_size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER:
        raise bad(f"the header claims {n} bytes, over the {MAX_HEADER}-byte limit")
    if 8 + n > file_size:
        raise bad(
            f"the header claims {n} bytes but the file has only {file_size - 8} after the "
            "length field (truncated?)"
        )
    raw = f.read(n)
    if len(raw) != n:
        raise bad("the header is cut short (truncated file?)")
    if raw.startswith(b"\xef\xbb\xbf"):
        raise bad(
            "the header starts with a UTF-8 byte-order mark; it must start with '{' "
            "(re-save the file without the BOM)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the header is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        # Floats parse (JSON allows them); the shape and offset checks below refuse them with
        # a message that names the field.
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except FormatError as err:
        raise bad(str(err)) from None
    except json.JSONDecodeError as e:
        raise bad(f"the header is not JSON ({e.msg} at byte {e.pos})") from None
    except (ValueError, RecursionError) as e:  # a 5000-digit number, arrays nested 10**5 deep
        raise bad(f"the header cannot be parsed ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise bad("the header is not a JSON object")

    metadata = doc.pop("__metadata__", None)
    if metadata is None:  # null, as absent (the reference reader agrees)
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad("__metadata__ must map strings to strings")
    if "\\ud" in text or "\\uD" in text:  # a \uXXXX escape of a surrogate: one left unpaired
        for name in (*doc, *metadata, *metadata.values()):  # is not text, nor a name to write
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise bad(f"{name!r} holds an unpaired surrogate escape, not a character") from None

    data_start = 8 + n
    data_size = file_size - data_start
    entries: list[tuple[str, Entry]] = []
    for name, spec in doc.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r}: expected exactly dtype, shape and data_offsets")
        code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if not isinstance(code, str):  # a list or object would not even hash
            raise bad(f'tensor {name!r}: dtype must be a string such as "F32", not {code!r}')
        if code not in SAFETENSORS_DTYPES:
            raise bad(f"tensor {name!r}: unknown dtype {code!r}")
        # type() is int: JSON gives exact ints, and a bool is not one (200k tensors: keep it lean)
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < _U64 for d in shape):
            raise bad(f"tensor {name!r}: shape must be a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
        ):
            raise bad(f"tensor {name!r}: data_offsets must be two integers")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise bad(f"tensor {name!r}: data_offsets {offsets} are not ordered")
        if end > data_size:
            raise bad(
                f"tensor {name!r}: its data ends at byte {end} of a {data_size}-byte data "
                "section (truncated file?)"
            )
        dtype, itemsize = SAFETENSORS_DTYPES[code]
        nbytes = math.prod(shape) * itemsize
        if nbytes >= _U64:
            raise bad(f"tensor {name!r}: shape {shape} of {code} is too large for any file")
        if nbytes != end - begin:
            raise bad(
                f"tensor {name!r}: shape {shape} of {code} needs {nbytes} bytes but "
                f"data_offsets span {end - begin}"
            )
        info = TensorInfo(tuple(shape), dtype, nbytes)
        entries.append((name, Entry(info, data_start + begin, data_start + end)))

    cursor = data_start
    for name, entry in sorted(entries, key=lambda kv: (kv[1].begin, kv[1].end)):
        if entry.begin != cursor:
            what = "overlaps the previous tensor" if entry.begin < cursor else "leaves a gap"
            raise bad(f"tensor {name!r} {what} (data offsets must tile the data section)")
        cursor = entry.end
    if cursor != file_size:
        raise bad(f"{file_size - cursor} bytes after the last tensor's data")
    return Header(dict(entries), metadata, data_start)


# Written by ckptsurgery into safetensors metadata: tied names -> the name actually stored.
ALIASES_KEY = "ckptsurgery.aliases"


class SafetensorsCheckpoint(Checkpoint):
    """A safetensors file: its validated header, and each tensor's byte range read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.format = SAFETENSORS
        self.other_entries = {}
        self._f: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            header = read_header(self._f, os.fstat(self._f.fileno()).st_size, source=str(path))
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

    def tapped_crcs(self, names: Iterable[str]) -> dict[str, Callable[[], int]]:
        spans = []
        for name in names:
            entry = self._entries[self.canonical(name)]
            spans.append((name, entry.begin, entry.end - entry.begin))
        return tap_digest(self._f, spans)

    def data_spans(self, names: Iterable[str]) -> dict[str, tuple[int, int]]:
        out = {}
        for name in names:
            entry = self._entries[self.canonical(name)]
            out[name] = (entry.begin, entry.end - entry.begin)
        return out

    def tensor(self, name: str) -> torch.Tensor:
        import torch

        info = self.infos[name]
        dtype = torch_dtype(info.dtype)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        data = self.raw_bytes(name)
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(info.shape)

    def bytes_view(self, name: str) -> bytes | memoryview:
        # A big tensor is mapped, not copied: the kernel hands over its page-cache pages, and
        # unmaps them when the view is freed (so memory holds the tensors alive, not the file)
        entry = self._entries[self.canonical(name)]
        length = entry.end - entry.begin
        if length < _MAP_AT_LEAST:
            return self.raw_bytes(name)
        fd = self._f.fileno()
        if entry.end > os.fstat(fd).st_size:
            raise FormatError(f"{self._what(name)} is cut short (truncated file?)")
        start = entry.begin - entry.begin % mmap.ALLOCATIONGRANULARITY
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        m = mmap.mmap(fd, entry.end - start, flags=flags, prot=mmap.PROT_READ, offset=start)
        return memoryview(m)[entry.begin - start :]

    def tensor_view(self, name: str) -> torch.Tensor:
        entry = self._entries[self.canonical(name)]
        if entry.end - entry.begin < _MAP_AT_LEAST:
            return self.tensor(name)
        import torch

        data = self.bytes_view(name)
        with warnings.catch_warnings():  # read-only on purpose: the caller only reads it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(data, dtype=torch.uint8)
        info = self.infos[name]
        return flat.view(torch_dtype(info.dtype)).reshape(info.shape)

    def close(self) -> None:
        self._f.close()


_MAP_AT_LEAST = 1 << 20  # smaller tensors are read: a map costs more than their copy


def _parse_aliases(
    metadata: dict[str, str], entries: dict[str, Entry], *, source: str
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


def data_layout(items: Iterable[tuple[str, TensorInfo]]) -> list[tuple[str, TensorInfo]]:
    """The order tensors' data is stored in: largest element first, otherwise as given.

    The data section starts 8-aligned, so every tensor then starts at a multiple of its
    element size, as the reference writer arranges; mmap-based readers rely on it.
    """
    return sorted(
        items, key=lambda kv: -SAFETENSORS_DTYPES[safetensors_code(kv[1].dtype, key=kv[0])][1]
    )


def encode_header(
    items: Iterable[tuple[str, TensorInfo]],
    metadata: Mapping[str, str],
    *,
    size: int | None = None,
) -> tuple[bytes, list[tuple[str, TensorInfo]]]:
    """The header bytes (length field included), and the order to write the data in.

    The header lists the tensors in the given order; their data is laid out by
    :func:`data_layout`. With ``size``, the header is padded with spaces to exactly that many
    bytes (to rewrite a header in place once late metadata is known).
    """
    items = list(items)
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise OutputError(
                f"metadata {key!r}: {value!r}: safetensors metadata maps strings to strings; "
                "convert the value with str() or json.dumps()"
            )
    doc: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    for name, _ in items:
        if name == "__metadata__":
            raise OutputError(
                "a tensor named '__metadata__' cannot be stored in safetensors (the name is "
                "reserved); rename it or write a torch file (--format torch)"
            )
        doc[name] = None  # the header's order; filled in below
    layout = data_layout(items)
    offset = 0
    for name, info in layout:
        doc[name] = {
            "dtype": safetensors_code(info.dtype, key=name),
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if size is not None:
        if 8 + len(text) > size:
            raise OutputError(f"the final header needs {8 + len(text)} bytes, {size} reserved")
        text += b" " * (size - 8 - len(text))
    else:
        text += b" " * (-(8 + len(text)) % ALIGN)
    return struct.pack("<Q", len(text)) + text, layout


def write_file(
    f: BinaryIO,
    items: list[tuple[str, TensorInfo]],
    write_data: Callable[[str, BinaryIO], int],
    metadata: Mapping[str, str],
    *,
    written: Callable[[str, int, int], None] | None = None,
) -> int:
    """Write header and data; ``write_data(name, f)`` writes one tensor's bytes when its turn
    comes and returns how many it wrote. Returns the file's size. ``written(name, begin,
    length)`` is told where each tensor's bytes went (``begin`` from the file's start) once
    they are handed to ``f``."""
    start = f.tell() if written is not None else 0
    header, layout = encode_header(items, metadata)
    f.write(header)
    size = len(header)
    for name, info in layout:
        n = write_data(name, f)
        if n != info.nbytes:
            raise FormatError(f"tensor {name!r}: expected {info.nbytes} bytes of data, got {n}")
        if written is not None:
            written(name, start + size, n)
        size += info.nbytes
    return size


def rewrite_header(
    f: BinaryIO,
    items: list[tuple[str, TensorInfo]],
    metadata: Mapping[str, str],
    *,
    size: int,
    start: int = 0,
) -> None:
    """Rewrite, in place, the ``size``-byte header :func:`write_file` wrote at ``start``, with
    new metadata; the data section does not move. ``f`` is left at its end."""
    end = f.seek(0, 2)
    header, _ = encode_header(items, metadata, size=size)
    f.seek(start)
    f.write(header)
    f.seek(end)
