"""torch.distributed.checkpoint (DCP) folders as sources, read without torch.

A DCP folder (``FileSystemWriter``) holds ``.metadata`` (a pickled ``Metadata``: every
tensor's dtype, size and chunks, and where each chunk's bytes are) and data files
``__<rank>_<n>.distcp``, each a run of ``torch.save`` archives, one per chunk. Names, shapes
and dtypes come from ``.metadata`` alone. A tensor is fetched chunk by chunk from the
archives (:mod:`ckptsurgery.io.torchzip`); chunks split along the first dimension (FSDP,
``Shard(0)``) are streamed straight through, other layouts are assembled in memory, one
tensor at a time.

``.metadata`` is a pickle from wherever the checkpoint came from: it is read with an
unpickler of our own that builds inert records for the DCP metadata classes and plain
containers, and refuses every other global.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ckptsurgery.errors import FormatError, SourceError
from ckptsurgery.io.base import Checkpoint
from ckptsurgery.io.detect import DCP, unsafe_file_name
from ckptsurgery.io.dtypes import TensorInfo
from ckptsurgery.io.torchpickle import (
    ITEMSIZE,
    Sealed,
    TensorRef,
    Unsupported,
    pickle_hazard,
    ref_type_name,
)
from ckptsurgery.io.torchzip import ZipTensors, _tensor_from_bytes
from ckptsurgery.io.ziparchive import ZipArchive
from ckptsurgery.state_dict import Selector

if TYPE_CHECKING:
    import torch

MAX_METADATA = 1024 * 1024 * 1024  # bytes of .metadata read at most

_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo")}  # fmt: skip


class _Record:
    """An inert stand-in for one DCP metadata object: its pickled state, nothing more."""

    kind = ""
    # also when a pickle makes one with NEWOBJ (cls.__new__, no __init__) and never BUILDs it
    args: tuple[object, ...] = ()
    state: object = None

    def __init__(self, *args: object) -> None:  # an enum member rebuilt from its value
        self.args = args
        self.state = None

    def __setstate__(self, state: object) -> None:
        self.state = state

    def field(self, name: str) -> object:
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots) as slotted classes give
        if not isinstance(state, dict):
            raise FormatError(f"a {self.kind} record without fields")
        return state.get(name)


_RECORDS: dict[str, type[_Record]] = {
    name: type(name, (_Record,), {"kind": name, "__module__": __name__}) for _, name in _DCP_CLASSES
}


class _BadSize(FormatError):
    """A size or offset in the metadata that is not non-negative integers (source added)."""


def _size(dims: object) -> tuple[int, ...]:
    # bounded: a 5000-digit number cannot even be put in an error message
    if not isinstance(dims, tuple | list) or not all(
        type(d) is int and 0 <= d < 2**63 for d in dims
    ):
        raise _BadSize("a size or offset that is not a list of non-negative integers")
    return tuple(dims)


def _layout(name: object) -> str:
    return str(name)


def _path(*parts: object) -> str:
    return "/".join(str(p) for p in parts)


_SIZE, _LAYOUT, _PATH = Sealed(_size), Sealed(_layout), Sealed(_path)  # as handed out


@dataclass(frozen=True, slots=True)
class _DType:
    name: str

    def __setstate__(self, state: object) -> None:  # not the one slots=True would add
        raise Unsupported("a pickle that sets the state of a dtype")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[module, name]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _DCP_CLASSES:
            return _RECORDS[name]
        if module == "torch" and name == "Size":
            return _SIZE
        if module == "torch" and name in ITEMSIZE:
            return _DType(name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _LAYOUT
        if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath",
                                            "PureWindowsPath", "Path"):  # fmt: skip
            return _PATH  # StorageMeta.checkpoint_id: kept as text, never a real path
        if (module, name) in (("builtins", "set"), ("builtins", "frozenset")):
            return set if name == "set" else frozenset
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise Unsupported(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise Unsupported("a persistent id")


def read_metadata(path: Path) -> _Record:
    """The ``Metadata`` record of a DCP ``.metadata`` file, unpickled into inert records."""
    size = path.stat().st_size
    if size > MAX_METADATA:
        raise FormatError(f"{str(path)!r}: {size} bytes of DCP metadata, over the limit")
    data = path.read_bytes()
    # protocol 5 adds only out-of-band buffers, which no metadata holds
    hazard = pickle_hazard(data, protocol=4)
    if hazard:
        raise FormatError(f"{str(path)!r}: malformed DCP metadata (a pickle with {hazard})")
    try:
        root = _MetadataUnpickler(io.BytesIO(data)).load()
    except _BadSize as e:
        raise FormatError(f"{str(path)!r}: malformed DCP metadata ({e})") from None
    except Unsupported as e:
        raise FormatError(
            f"{str(path)!r}: refusing to unpickle {e} in DCP metadata: only the "
            "torch.distributed.checkpoint metadata classes are read"
        ) from None
    except Exception as e:  # a damaged pickle fails in many ways
        raise FormatError(
            f"{str(path)!r}: truncated or malformed DCP metadata ({type(e).__name__})"
        ) from None
    if not isinstance(root, _RECORDS["Metadata"]):
        raise FormatError(f"{str(path)!r}: not a torch.distributed.checkpoint Metadata")
    return root


@dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    begin: int  # of its torch.save archive in the data file
    length: int


class DcpTensor:
    """One tensor of a DCP checkpoint: its properties and chunks."""

    def __init__(self, fqn: str, info: TensorInfo, chunks: list[_Chunk]) -> None:
        self.fqn = fqn
        self.info = info
        self.chunks = chunks


class _DcpBytes:
    """A non-tensor entry (``BytesStorageMetadata``): an object saved with ``torch.save``."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _type_name(obj: object) -> str:
    if isinstance(obj, DcpTensor):
        return "torch.Tensor"
    if isinstance(obj, _DcpBytes):
        return obj.type_name
    return ref_type_name(obj)


class DcpCheckpoint(Checkpoint):
    """A torch.distributed.checkpoint folder; tensors assembled from their chunks."""

    def __init__(self, folder: Path, *, key: str | None) -> None:
        self.path = folder
        self.format = DCP
        self.metadata = {}
        self._files: dict[str, BinaryIO] = {}
        source = repr(str(folder))
        meta = read_metadata(folder / ".metadata")
        try:
            try:
                root = self._tree(meta, source)
            except _BadSize as e:
                raise FormatError(f"{source}: malformed DCP metadata ({e})") from None
            sd, self.key, self.other_entries = Selector(DcpTensor, _type_name).select(
                root, key, source=str(folder)
            )
        except BaseException:
            self.close()
            raise
        self._tensors: dict[str, DcpTensor] = dict(sd)
        self.infos = {name: t.info for name, t in self._tensors.items()}
        self.aliases = {}

    def _tree(self, meta: _Record, source: str) -> dict[Any, Any]:
        """The saved state dict's nesting (from the planner's paths), with stand-ins."""
        entries = meta.field("state_dict_metadata")
        storage = meta.field("storage_data")
        paths = meta.field("planner_data")
        if not isinstance(entries, dict) or not isinstance(storage, dict):
            raise FormatError(f"{source}: DCP metadata without state_dict_metadata")
        where: dict[tuple[str, tuple[int, ...] | None], _Record] = {}
        for index, info in storage.items():
            if not isinstance(index, _Record) or not isinstance(info, _Record):
                raise FormatError(f"{source}: malformed DCP storage_data")
            offset = index.field("offset")
            fqn = index.field("fqn")
            if not isinstance(fqn, str):
                raise FormatError(f"{source}: malformed DCP storage_data")
            where[fqn, None if offset is None else _size(offset)] = info
        root: dict[Any, Any] = {}
        for fqn, entry in entries.items():
            if not isinstance(fqn, str) or not isinstance(entry, _Record):
                raise FormatError(f"{source}: malformed DCP state_dict_metadata")
            if entry.kind == "TensorStorageMetadata":
                value: object = self._tensor(fqn, entry, where, source)
            elif entry.kind == "BytesStorageMetadata":
                value = _DcpBytes(self._bytes_type(where.get((fqn, None)), source))
            else:
                raise FormatError(f"{source}: {fqn!r} has unknown DCP metadata {entry.kind}")
            path = paths.get(fqn) if isinstance(paths, dict) else None
            if not (isinstance(path, tuple | list) and path and
                    all(isinstance(p, str | int) for p in path)):  # fmt: skip
                path = (fqn,)
            node = root
            for part in path[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise FormatError(f"{source}: {fqn!r} is nested under a tensor")
            if path[-1] in node:
                raise FormatError(f"{source}: two entries are saved as {fqn!r}")
            node[path[-1]] = value
        return root

    def _tensor(
        self,
        fqn: str,
        entry: _Record,
        where: Mapping[tuple[str, tuple[int, ...] | None], _Record],
        source: str,
    ) -> DcpTensor:
        props, size, chunks = entry.field("properties"), entry.field("size"), entry.field("chunks")
        if not isinstance(props, _Record) or not isinstance(chunks, list):
            raise FormatError(f"{source}: tensor {fqn!r}: malformed DCP metadata")
        state = props.state
        dtype = state[0] if isinstance(state, tuple) and state else props.field("dtype")
        layout = state[1] if isinstance(state, tuple) and len(state) > 1 else "torch.strided"
        if not isinstance(dtype, _DType):
            raise FormatError(f"{source}: tensor {fqn!r} has a dtype ckptsurgery does not know")
        if layout != "torch.strided":
            shown = layout if isinstance(layout, str) else type(layout).__name__
            raise FormatError(f"{source}: tensor {fqn!r} is a {shown} tensor; only dense ones")
        shape = _size(size)
        nbytes = math.prod(shape) * ITEMSIZE[dtype.name]
        if nbytes >= 2**64:
            raise FormatError(f"{source}: tensor {fqn!r}: its size {list(shape)} is too large")
        info = TensorInfo(shape, dtype.name, nbytes)
        parts: list[_Chunk] = []
        for chunk in chunks:
            if not isinstance(chunk, _Record):
                raise FormatError(f"{source}: tensor {fqn!r}: malformed chunk")
            offsets, sizes = _size(chunk.field("offsets")), _size(chunk.field("sizes"))
            if (
                len(offsets) != len(shape)
                or len(sizes) != len(shape)
                or any(o + n > d for o, n, d in zip(offsets, sizes, shape, strict=True))
            ):
                raise FormatError(f"{source}: tensor {fqn!r}: a chunk lies outside its shape")
            stored = where.get((fqn, offsets))
            if stored is None:
                raise FormatError(f"{source}: tensor {fqn!r}: chunk at {list(offsets)} not stored")
            file, begin, length = self._location(stored, source, fqn)
            parts.append(_Chunk(offsets, sizes, file, begin, length))
        _check_tiling(fqn, shape, parts, source)
        return DcpTensor(fqn, info, parts)

    def _location(self, stored: _Record, source: str, fqn: str) -> tuple[str, int, int]:
        file, begin, length = (stored.field(n) for n in ("relative_path", "offset", "length"))
        if stored.field("transform_descriptors"):
            raise FormatError(
                f"{source}: {fqn!r} is stored through transforms (compression?), which "
                "ckptsurgery does not read"
            )
        if not isinstance(file, str) or unsafe_file_name(file):
            shown = repr(file) if isinstance(file, str) else f"a {type(file).__name__}"
            raise FormatError(f"{source}: {fqn!r} is stored in {shown}, not a file of the folder")
        if type(begin) is not int or type(length) is not int or begin < 0 or length < 0:
            raise FormatError(f"{source}: {fqn!r} has a malformed storage offset")
        return file, begin, length

    def _file(self, name: str) -> BinaryIO:
        f = self._files.get(name)
        if f is None:
            path = self.path / name
            if not path.is_file():
                raise SourceError(f"{str(self.path)!r}: data file {name!r} is missing")
            f = self._files[name] = open(path, "rb")  # noqa: SIM115 - closed by close()
        return f

    def _archive(self, chunk: _Chunk, source: str) -> tuple[ZipTensors, TensorRef]:
        f = self._file(chunk.file)
        if chunk.begin + chunk.length > os.fstat(f.fileno()).st_size:
            raise FormatError(f"{source}: {chunk.file!r} is shorter than its metadata says")
        zf = ZipArchive(f, base=chunk.begin, length=chunk.length, source=f"{source}/{chunk.file}")
        try:
            tensors = ZipTensors(f, zf)
        except Unsupported as e:
            raise FormatError(
                f"{source}/{chunk.file}: a chunk holds more than a tensor ({e})"
            ) from None
        ref = tensors.loaded.root
        if not isinstance(ref, TensorRef):
            raise FormatError(f"{source}/{chunk.file}: a chunk holds no tensor")
        return tensors, ref

    def _bytes_type(self, stored: _Record | None, source: str) -> str:
        if stored is None:
            return "object"
        try:
            file, begin, length = self._location(stored, source, "entry")
            f = self._file(file)
            zf = ZipArchive(f, base=begin, length=length, source=source)
            return ref_type_name(ZipTensors(f, zf).loaded.root)
        except (Unsupported, FormatError, SourceError):
            return "object"  # reported by name only; its content is never needed

    def _chunk_bytes(self, name: str, chunk: _Chunk) -> tuple[ZipTensors, TensorRef]:
        source = repr(str(self.path))
        tensors, ref = self._archive(chunk, source)
        info = self.infos[name]
        if ref.shape != chunk.sizes or ref.dtype != info.dtype:
            raise FormatError(
                f"{source}: tensor {name!r}: a chunk holds {ref.dtype}{list(ref.shape)}, the "
                f"metadata says {info.dtype}{list(chunk.sizes)}"
            )
        return tensors, ref

    def _streamable(self, t: DcpTensor) -> list[_Chunk] | None:
        """The chunks in storage order when they are slabs along dim 0, else None."""
        shape = t.info.shape
        if not shape:
            return t.chunks
        if any(c.sizes[1:] != shape[1:] for c in t.chunks):
            return None
        return sorted((c for c in t.chunks if c.sizes[0]), key=lambda c: c.offsets[0])

    def write_data(self, name: str, f: BinaryIO) -> int:
        t = self._tensors[name]
        chunks = self._streamable(t)
        if chunks is None:
            data = self.raw_bytes(name)
            f.write(data)
            return len(memoryview(data).cast("B"))
        written = 0
        for chunk in chunks:
            tensors, ref = self._chunk_bytes(name, chunk)
            written += tensors.write(ref, f, what=f"{self.path}: a chunk of {name!r}")
        return written

    def raw_bytes(self, name: str) -> bytes | memoryview:
        t = self._tensors[name]
        if self._streamable(t) is not None:
            out = io.BytesIO()
            self.write_data(name, out)
            return out.getbuffer()
        import numpy as np

        item = ITEMSIZE[t.info.dtype]
        # every chunk's archive is checked before the tensor is allocated: the shape is the
        # metadata's claim, the chunks' records are bytes in the data files
        parts = [(chunk, *self._chunk_bytes(name, chunk)) for chunk in t.chunks]
        full = np.zeros((*t.info.shape, item), dtype=np.uint8)
        for chunk, tensors, ref in parts:
            data = tensors.read(ref, what=f"{self.path}: a chunk of {name!r}")
            part = np.frombuffer(data, dtype=np.uint8).reshape((*chunk.sizes, item))
            where = tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes, strict=True))
            full[where] = part
        return memoryview(full.tobytes())

    def tensor(self, name: str) -> torch.Tensor:
        return _tensor_from_bytes(bytes(self.raw_bytes(name)), self.infos[name])

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _check_tiling(fqn: str, shape: tuple[int, ...], chunks: list[_Chunk], source: str) -> None:
    """Chunks must cover the tensor exactly: no gap (garbage bytes) and no overlap."""
    total = sum(math.prod(c.sizes) for c in chunks)
    if total != math.prod(shape):
        raise FormatError(
            f"{source}: tensor {fqn!r}: its chunks hold {total} elements, its shape "
            f"{list(shape)} needs {math.prod(shape)}"
        )
    boxes = [c for c in chunks if math.prod(c.sizes)]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if all(
                ao < bo + bn and bo < ao + an
                for ao, an, bo, bn in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
            ):
                raise FormatError(f"{source}: tensor {fqn!r}: two chunks overlap")
