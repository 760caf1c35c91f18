"""torch zip archives without torch: names from the pickle, tensor bytes from the records.

:class:`TorchZipCheckpoint` reads a ``torch.save`` archive through :mod:`torchpickle`'s
restricted unpickler: names, shapes and dtypes come from ``data.pkl`` alone, and a tensor's
bytes are a byte range of its storage record (records are stored uncompressed). A tensor that
is contiguous is copied straight from the file through the bounded buffer; a strided view is
gathered element by element (numpy, over a memory map). torch is imported only when a caller
asks for a ``torch.Tensor``.

:func:`write_torch_zip` writes the archive ``torch.save`` would write for a flat state dict,
one storage record per stored tensor, streaming each tensor from its source. A record copied
whole and unchanged from a source archive keeps the source's (verified) CRC-32.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ckptsurgery.io.base import Checkpoint, RecordCheck
from ckptsurgery.io.dtypes import TensorInfo, torch_dtype
from ckptsurgery.io.streams import copy_range, crc_of_range, crcs_of_spans, read_range
from ckptsurgery.io.torchpickle import (
    ITEMSIZE,
    StoredTensor,
    TensorRef,
    Unsupported,
    dump_state_dict,
    load_refs,
    ref_type_name,
)
from ckptsurgery.io.ziparchive import ZipArchive, ZipWriter
from ckptsurgery.state_dict import Selector

if TYPE_CHECKING:
    import torch

ARCHIVE = "archive"  # the record prefix torch.save uses when writing to a file object


def archive_prefix(zf: ZipArchive) -> str:
    """``<archive>/`` of the one ``data.pkl``; refuses what is not a torch checkpoint."""
    names = list(zf.records)
    pkls = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkls) != 1:
        raise zf.error(f"a torch archive holds exactly one data.pkl, this one {len(pkls)}")
    return pkls[0][: -len("data.pkl")]


def open_archive(f: BinaryIO, *, base: int, length: int, source: str) -> ZipArchive:
    zf = ZipArchive(f, base=base, length=length, source=source)
    archive_prefix(zf)
    return zf


class ZipTensors:
    """The tensors one torch archive holds, as stand-ins with their byte ranges."""

    def __init__(self, f: BinaryIO, zf: ZipArchive) -> None:
        self.f = f
        self.zf = zf
        self.prefix = archive_prefix(zf)
        byteorder = self.prefix + "byteorder"
        if byteorder in zf.records and zf.read(byteorder).strip() not in (b"little", b""):
            raise Unsupported("a big-endian archive")  # torch byte-swaps it on load
        self.loaded = load_refs(zf.read(self.prefix + "data.pkl"))
        self._verified: set[str] = set()  # records whose CRC-32 was checked
        self._deferred: set[str] = set()  # records a helper thread is checking
        self._map: mmap.mmap | None = None
        for ref in self.loaded.storages.values():
            name = self.record_name(ref.key)
            rec = zf.records.get(name)
            if rec is None:
                raise zf.error(f"the pickle refers to storage {ref.key!r}, which has no record")
            if rec.size != ref.nbytes:
                raise zf.error(
                    f"storage record {name!r} holds {rec.size} bytes but the pickle declares "
                    f"{ref.nbytes}"
                )

    def record_name(self, key: str) -> str:
        return f"{self.prefix}data/{key}"

    def begin(self, t: TensorRef) -> int:
        return self.zf.data_offset(self.record_name(t.storage.key)) + t.byte_offset

    def write(self, t: TensorRef, out: BinaryIO, *, what: str) -> int:
        """Copy the tensor's bytes (C order) to ``out``; return how many."""
        if not t.is_contiguous:
            data = self.gather(t, what=what)
            out.write(data)
            return len(data)
        begin = self.begin(t)
        name = self.record_name(t.storage.key)
        if t.whole_storage and (name in self._verified or name in self._deferred):
            copy_range(self.f, begin, t.nbytes, out, what=what)
        elif t.whole_storage:
            crc = copy_range(self.f, begin, t.nbytes, out, what=what, crc=0)
            assert crc is not None
            self.zf.check_crc(name, crc)
            self._verified.add(name)
        else:
            self.verify(t)
            copy_range(self.f, begin, t.nbytes, out, what=what)
        return t.nbytes

    def check_jobs(self, refs: Iterable[TensorRef], path: Path) -> list[RecordCheck]:
        """A check of the CRC-32 of these tensors' records through a file handle of its own,
        meant for a helper thread: copying them then skips the check, which overlaps the
        copy and the output's fsync instead. It raises for a corrupt record."""
        names = dict.fromkeys(
            self.record_name(t.storage.key) for t in refs if t.is_contiguous and t.whole_storage
        )
        todo = [n for n in names if n not in self._verified and n not in self._deferred]
        if not todo:
            return []
        spans = [(n, self.zf.data_offset(n), self.zf.records[n].size) for n in todo]
        self._deferred.update(todo)

        def run() -> None:
            try:
                with open(path, "rb") as f:
                    for name, begin, size in spans:
                        if crc_of_range(f, begin, size, what=name) != self.zf.records[name].crc:
                            raise self.zf.crc_error(name)
                        self._verified.add(name)
            finally:
                self._deferred.difference_update(todo)  # unchecked ones are checked inline

        def settle(proven: bool) -> None:
            if proven:
                self._verified.update(todo)
            self._deferred.difference_update(todo)

        return [RecordCheck(run, settle)]

    def read(self, t: TensorRef, *, what: str) -> bytearray | bytes:
        if not t.is_contiguous:
            return self.gather(t, what=what)
        name = self.record_name(t.storage.key)
        if not t.whole_storage or name in self._verified:
            self.verify(t)
            return read_range(self.f, self.begin(t), t.nbytes, what=what)
        data = read_range(self.f, self.begin(t), t.nbytes, what=what)
        self.zf.check_crc(name, zlib.crc32(data))  # the record itself: one read for both
        self._verified.add(name)
        return data

    def verify(self, t: TensorRef) -> None:
        """Check the CRC-32 of the tensor's whole storage record, once."""
        name = self.record_name(t.storage.key)
        if name in self._verified:
            return
        rec = self.zf.records[name]
        begin = self.zf.data_offset(name)
        self.zf.check_crc(name, crc_of_range(self.f, begin, rec.size, what=name))
        self._verified.add(name)

    def gather(self, t: TensorRef, *, what: str) -> bytes:
        """A strided view's elements in C order, copied as raw bytes (never as numbers)."""
        import numpy as np

        self.verify(t)
        if t.numel == 0:
            return b""
        if self._map is None:
            self._map = mmap.mmap(self.f.fileno(), 0, access=mmap.ACCESS_READ)
        record = self.begin(t) - t.byte_offset  # the storage's first byte in the file
        storage = np.frombuffer(self._map, dtype=np.uint8, count=t.storage.nbytes, offset=record)
        # each element as itemsize bytes: the bytes are moved, never read as numbers
        view = np.lib.stride_tricks.as_strided(
            storage[t.byte_offset :],
            shape=(*t.shape, t.itemsize),
            strides=(*(s * t.itemsize for s in t.stride), 1),
            writeable=False,
        )
        data = np.ascontiguousarray(view).tobytes()
        del view, storage  # release the map's buffer before it may be closed
        return data

    def close(self) -> None:
        if self._map is not None:
            # a view still alive somewhere keeps the map open; the GC unmaps it later
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None


def select_refs(
    root: Any, key: str | None, *, source: str
) -> tuple[Mapping[str, TensorRef], str | None, dict[str, str]]:
    """(state dict, its key path, other top-level entries), as ``select_state_dict``."""
    return Selector(TensorRef, ref_type_name).select(root, key, source=source)


# --- the checkpoint -------------------------------------------------------------------------


def tensors_from_refs(
    refs: Mapping[str, TensorRef],
) -> tuple[dict[str, TensorRef], dict[str, TensorInfo], dict[str, str]]:
    """Names -> refs, infos, and tied aliases (same storage and view, as torch ties them)."""
    out: dict[str, TensorRef] = {}
    infos: dict[str, TensorInfo] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[object, ...], str] = {}
    for name, ref in refs.items():
        out[name] = ref
        infos[name] = TensorInfo(ref.shape, ref.dtype, ref.nbytes)
        ident = ref.identity()
        if ident is not None and ident in seen:
            aliases[name] = seen[ident]
        elif ident is not None:
            seen[ident] = name
    return out, infos, aliases


def _tensor_from_bytes(data: bytearray | bytes, info: TensorInfo) -> torch.Tensor:
    import torch

    dtype = torch_dtype(info.dtype)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    buf = data if isinstance(data, bytearray) else bytearray(data)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(info.shape)


class TorchZipCheckpoint(Checkpoint):
    """A torch zip file read without torch. Raises :class:`Unsupported` when its pickle
    needs more than the stand-ins understand: ``torch.load`` must read it then."""

    def __init__(self, path: Path, *, key: str | None) -> None:
        self.path = path
        self.format = "torch-zip"
        self.metadata = {}
        self._f: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            size = os.fstat(self._f.fileno()).st_size
            zf = ZipArchive(self._f, base=0, length=size, source=repr(str(path)))
            self._zip = ZipTensors(self._f, zf)
            sd, self.key, self.other_entries = select_refs(
                self._zip.loaded.root, key, source=str(path)
            )
            self._refs, self.infos, self.aliases = tensors_from_refs(sd)
        except BaseException:
            self._f.close()
            raise

    def _what(self, name: str) -> str:
        return f"{self.path}: the data of {name!r}"

    def raw_bytes(self, name: str) -> bytes | memoryview:
        ref = self._refs[self.canonical(name)]
        return memoryview(self._zip.read(ref, what=self._what(name)))

    def write_data(self, name: str, f: BinaryIO) -> int:
        ref = self._refs[self.canonical(name)]
        return self._zip.write(ref, f, what=self._what(name))

    def check_jobs(self, names: Iterable[str]) -> list[RecordCheck]:
        refs = [self._refs[self.canonical(n)] for n in names]
        return self._zip.check_jobs(refs, self.path)

    def record_crc(self, name: str) -> int | None:
        ref = self._refs[self.canonical(name)]
        if not ref.whole_storage:
            return None
        return self._zip.zf.records[self._zip.record_name(ref.storage.key)].crc

    def data_crc(self, name: str) -> int:
        ref = self._refs[self.canonical(name)]
        if not (ref.whole_storage and ref.is_contiguous):
            return super().data_crc(name)
        # the record itself, hashed in place (the caller compares it with what it expects)
        return crc_of_range(self._f, self._zip.begin(ref), ref.nbytes, what=self._what(name))

    def data_crcs(self, names: Iterable[str]) -> dict[str, int]:
        spans: list[tuple[str, int, int]] = []
        others: list[str] = []
        for name in names:
            ref = self._refs[self.canonical(name)]
            if ref.whole_storage:
                spans.append((name, self._zip.begin(ref), ref.nbytes))
            else:
                others.append(name)
        out = crcs_of_spans(self._f, spans, what=str(self.path))
        out.update(super().data_crcs(others))
        return out

    def data_spans(self, names: Iterable[str]) -> dict[str, tuple[int, int]]:
        out = {}
        for name in names:
            ref = self._refs[self.canonical(name)]
            if ref.whole_storage and ref.is_contiguous:
                out[name] = (self._zip.begin(ref), ref.nbytes)
        return out

    def tensor(self, name: str) -> torch.Tensor:
        ref = self._refs[self.canonical(name)]
        return _tensor_from_bytes(self._zip.read(ref, what=self._what(name)), self.infos[name])

    def close(self) -> None:
        self._zip.close()
        self._f.close()


# --- writing --------------------------------------------------------------------------------


def can_write_torch_zip(infos: Sequence[TensorInfo]) -> bool:
    """Whether every dtype has a storage layout :func:`write_torch_zip` knows."""
    return all(i.dtype in ITEMSIZE for i in infos)


def write_torch_zip(
    f: BinaryIO,
    src: Checkpoint,
    names: Sequence[tuple[str, str]],
    *,
    force_zip64: bool = False,
    crcs: dict[str, int] | None = None,
    written: Callable[[str, int, int], None] | None = None,
) -> int:
    """Write ``src``'s tensors as a flat torch state dict under new names; return how many
    storages were written. Tied names share one storage; every tensor owns its storage whole.
    ``crcs`` receives the CRC-32 of each stored tensor's record, under its new name;
    ``written(name, begin, length)`` is told where each record's data went.
    """
    keys: dict[str, str] = {}  # source canonical name -> storage key
    stored: list[tuple[str, str]] = []  # (key, source name) in order
    stored_as: dict[str, str] = {}  # storage key -> the first new name that holds it
    entries: list[StoredTensor] = []
    for new, old in names:
        canon = src.canonical(old)
        if canon not in keys:
            keys[canon] = str(len(stored))
            stored.append((keys[canon], canon))
            stored_as[keys[canon]] = new
        info = src.infos[old]
        entries.append(StoredTensor(new, keys[canon], info.dtype, info.shape))
    pickle_bytes = dump_state_dict(entries)
    src.will_read([name for _, name in stored])
    zw = ZipWriter(f, force_zip64=force_zip64)
    zw.add(f"{ARCHIVE}/data.pkl", pickle_bytes)
    zw.add(f"{ARCHIVE}/.format_version", b"1")
    zw.add(f"{ARCHIVE}/.storage_alignment", b"64")
    zw.add(f"{ARCHIVE}/byteorder", b"little")
    for key, name in stored:
        zw.add_stream(
            f"{ARCHIVE}/data/{key}",
            src.infos[name].nbytes,
            lambda out, name=name: src.write_data(name, out),  # type: ignore[misc]
            crc=src.record_crc(name),
        )
        if written is not None:
            written(stored_as[key], *zw.last_data)
    zw.add(f"{ARCHIVE}/version", b"3\n")
    digest = hashlib.sha256(pickle_bytes).digest()
    # torch writes 40 decimal digits here; derived from the content, the output is reproducible
    serial = str(int.from_bytes(digest[:16], "big")).zfill(40)[:40]
    zw.add(f"{ARCHIVE}/.data/serialization_id", serial.encode())
    if crcs is not None:
        records = zw.crcs()
        crcs.update((new, records[f"{ARCHIVE}/data/{key}"]) for key, new in stored_as.items())
    zw.close()
    return len(stored)
