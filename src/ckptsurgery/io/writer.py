"""Writing a checkpoint: safetensors (one file or shards) or a flat torch state dict,
bit-exact and atomic, one tensor at a time.

Every tensor goes from its source to the output through ``src.write_data(name, f)``: a source
on disk copies the byte range through a bounded buffer, so memory stays flat whatever the
checkpoint's size. A torch output is a zip archive written here record by record
(:mod:`ckptsurgery.io.torchzip`), not through ``torch.save``, which would need every tensor in
memory at once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from ckptsurgery._types import PathLike
from ckptsurgery.errors import OutputError
from ckptsurgery.io import safetensors_format as stf
from ckptsurgery.io.atomic import atomic_folder, atomic_write
from ckptsurgery.io.base import Checkpoint
from ckptsurgery.io.checksums import crc32
from ckptsurgery.io.dtypes import TensorInfo
from ckptsurgery.io.memory import tensor_bytes
from ckptsurgery.io.progress import ProgressCallback, ProgressWriter
from ckptsurgery.io.streams import CrcWriter, in_background
from ckptsurgery.io.verify import Expected, ReadBack, verify_written

if TYPE_CHECKING:
    import torch

FORMATS = ("safetensors", "torch")
_EXTENSIONS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch"}

# Called on the finished temporary output before it takes its name (a seam for tests that
# damage the file in between).
verify_output = verify_written


def output_format(path: PathLike, fmt: str | None, *, sharded: bool = False) -> str:
    """The output format: ``fmt`` when given, else from the extension.

    A sharded output (a folder, or its ``*.safetensors.index.json``) is safetensors.
    """
    if fmt is not None:
        if fmt not in FORMATS:
            raise OutputError(f"unknown output format {fmt!r}; use safetensors or torch")
        if sharded and fmt != "safetensors":
            raise OutputError(
                "--max-shard-size writes safetensors shards; leave out --format torch"
            )
        return fmt
    if sharded:
        return "safetensors"
    suffix = Path(path).suffix.lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    raise OutputError(
        f"cannot tell the output format from {Path(path).name!r}; use a .safetensors, .pt, "
        ".pth or .bin name, or pass --format safetensors|torch"
    )


@dataclass(frozen=True)
class WriteResult:
    path: Path  # the file, or the folder of a sharded output
    format: str
    tensors: int  # names written (tied aliases included)
    stored: int  # tensors whose data was written (tied aliases stored once)
    bytes: int  # size of the file (of every file, for a sharded output)
    shards: int = 1  # safetensors files written (their index aside)
    # seconds spent, by stage: copy (reading, converting, writing, checksums on the way),
    # fsync, wait (for the helper threads' digests and source checks), verify (the re-read)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Deferred:
    """A metadata value known only once the data is written: a digest of the source,
    computed on another thread while the tensors are copied.

    The header is written with ``placeholder`` and rewritten in place at the end with
    ``resolve()``, which must not be longer than the placeholder.
    """

    placeholder: str
    resolve: Callable[[], str]


Metadata = Mapping[str, "str | Deferred"]


def _placeholders(metadata: Metadata) -> dict[str, str]:
    return {k: v.placeholder if isinstance(v, Deferred) else v for k, v in metadata.items()}


def _resolved(metadata: Metadata) -> dict[str, str]:
    return {k: v.resolve() if isinstance(v, Deferred) else v for k, v in metadata.items()}


def write_checkpoint(
    path: PathLike,
    src: Checkpoint,
    names: Sequence[tuple[str, str]],
    *,
    fmt: str,
    metadata: Metadata | None = None,
    overwrite: bool = True,
    max_shard_size: int | None = None,
    progress: ProgressCallback | None = None,
    verify: bool = True,
) -> WriteResult:
    """Write ``src``'s tensors under new names (``names`` = (new, old) pairs) atomically.

    ``path`` must already have been checked (:func:`check_output_path`, or
    :func:`check_output_folder` for shards); this only writes. With ``overwrite=False``, a
    file that appears at ``path`` meanwhile is not replaced. With ``max_shard_size`` (bytes),
    ``path`` is a folder (or its index) receiving safetensors shards and their index.
    ``progress(done, total)`` is called with the bytes written so far (of the tensors' data;
    headers aside) as they are written.

    With ``verify`` (the default), the CRC-32 of each tensor's bytes is kept as they are
    written, and the finished temporary output is re-opened through the reader and checked
    (names, shapes, dtypes, ties, those CRC-32s) before it takes its name; a difference raises
    :class:`OutputError` and leaves no output (a previous one intact).
    """
    path = Path(path)
    plan = _Plan(src, names)
    expected = Expected({new: src.infos[old] for new, old in names}, dict(plan.aliases))
    total = sum(src.infos[old].nbytes for _, old in plan.items)
    # a torch archive's records need their CRC-32 as written: nothing to tap there
    work = _SourceWork(src, plan, expected if verify else None, tap=fmt == "safetensors")
    try:
        if max_shard_size is not None:
            if fmt != "safetensors":
                raise OutputError("--max-shard-size writes safetensors shards only")
            result = _write_sharded(
                path, src, plan, metadata or {}, max_shard_size, overwrite, progress, total,
                work,
            )  # fmt: skip
        else:
            result = _write_file(path, src, plan, names, fmt, metadata or {}, overwrite,
                                 progress, total, work)  # fmt: skip
    except OSError as e:
        work.close(proven=False)
        raise OutputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    except BaseException:
        work.close(proven=False)
        raise
    work.close(proven=True)
    return result


def _write_file(
    path: Path,
    src: Checkpoint,
    plan: _Plan,
    names: Sequence[tuple[str, str]],
    fmt: str,
    metadata: Metadata,
    overwrite: bool,
    progress: ProgressCallback | None,
    total: int,
    work: _SourceWork,
) -> WriteResult:
    timings: dict[str, float] = {}
    read_back: ReadBack | None = None
    expected = work.expected

    def check(tmp: Path) -> None:
        assert expected is not None
        start = time.perf_counter()
        hashed = read_back.result() if read_back is not None else None
        work.verify(tmp, path, hashed)
        timings["verify"] = time.perf_counter() - start
        if read_back is not None:
            timings["read_back"] = read_back.busy

    with atomic_write(path, overwrite=overwrite, check=check if expected else None) as raw:
        start = time.perf_counter()
        f = _tracked(raw, progress, total)
        written = None
        if expected is not None:
            read_back = ReadBack(raw.fileno(), what=str(path))
            written = _Announcer(f, read_back)
        try:
            finish: Callable[[], None] | None = None
            if fmt == "safetensors":
                stored, finish = _write_safetensors(f, src, plan, metadata, work, written)
            else:
                stored = _write_torch(f, src, names, work, written)
        except BaseException:
            if read_back is not None:
                read_back.close()
            raise
        if written is not None:
            written.finish()  # what is left is hashed back during the fsync
        timings["copy"] = time.perf_counter() - start
        # The data goes to disk while the helper threads finish (the source's CRC checks,
        # a digest of it for the metadata, the rest of the read-back); then the header is
        # completed, and the atomic rename commits.
        start = time.perf_counter()
        raw.flush()
        os.fsync(raw.fileno())
        timings["fsync"] = time.perf_counter() - start
        start = time.perf_counter()
        work.join_checks()
        if finish is not None:
            finish()
        timings["wait"] = time.perf_counter() - start
        size = raw.seek(0, os.SEEK_END)
    return WriteResult(path, fmt, len(names), stored, size, timings=timings)


class _SourceWork:
    """What a write asks of its source on helper threads, beside the copy; with verification
    on (``expected`` given), each checksum is computed once.

    - The source checks what it streams against its own checksums (a torch archive's record
      CRC-32s) on a helper thread, as the copy goes.
    - Verifying, a record copied whole keeps its archive's CRC-32, which the output's bytes
      are compared with once written: that proves the source's bytes as well, so the
      source's own check of such a record is held back, and runs only when that comparison
      fails (to tell a corrupt source from a bad write).
    - Verifying, the bytes of a tensor copied whole from a file that is hashed anyway (a
      safetensors source's digest, for the provenance) are hashed by that pass, on its
      helper thread (:meth:`Checkpoint.tapped_crcs`).
    - Verifying, other bytes are hashed on their way out, while they are in the cache.
    """

    def __init__(
        self, src: Checkpoint, plan: _Plan, expected: Expected | None, *, tap: bool = True
    ) -> None:
        self.expected = expected
        olds = [old for _, old in plan.items]
        proven = []
        self.tapped: dict[str, Callable[[], int]] = {}  # old name -> its CRC-32, once hashed
        if expected is not None:
            proven = [old for old in olds if src.record_crc(old) is not None]
        held = set(proven)
        if expected is not None and tap:
            self.tapped = src.tapped_crcs(old for old in olds if old not in held)
            self._new_of = {old: new for new, old in plan.items if old in self.tapped}
        # the checks run now come first: a record also streamed otherwise (a cast) is checked
        self._checks = in_background(src.check_jobs(old for old in olds if old not in held))
        self._held = src.check_jobs(proven)

    def join_checks(self) -> None:
        self._checks()

    def verify(
        self, tmp: Path, out: Path, hashed: Mapping[str, tuple[int, int, int]] | None
    ) -> None:
        """Check the finished output ``tmp`` (see :mod:`ckptsurgery.io.verify`)."""
        assert self.expected is not None
        for old, crc in self.tapped.items():  # the pass over the source is done by now
            self.expected.crcs[self._new_of[old]] = crc()
        try:
            verify_output(tmp, self.expected, out=out, hashed=hashed)
        except OutputError:
            for held in self._held:  # a corrupt source is named as such, not as a bad write
                held.run()
            raise

    def close(self, *, proven: bool) -> None:
        """Settle the held checks: ``proven`` once the output matched the source's checksums."""
        for held in self._held:
            held.settle(proven)
        self._held = []


class _Announcer:
    """``written(name, begin, length)`` for the format writers: hands the ranges written to
    ``read_back`` in batches of at least ``_ANNOUNCE_BYTES`` (the file flushed first: the tail
    of a tensor may still sit in its buffer), so that a checkpoint of many tiny tensors costs
    one flush per batch, not one per tensor. :meth:`done` hands over the rest."""

    def __init__(self, f: BinaryIO, read_back: ReadBack) -> None:
        self._f = f
        self._read_back = read_back
        self._pending: list[tuple[str, int, int]] = []
        self._bytes = 0

    def __call__(self, name: str, begin: int, length: int) -> None:
        self._pending.append((name, begin, length))
        self._bytes += length
        if self._bytes >= _ANNOUNCE_BYTES:
            self.done()

    def done(self) -> None:
        if self._pending:
            self._f.flush()
            for span in self._pending:
                self._read_back.written(*span)
            self._pending, self._bytes = [], 0

    def finish(self) -> None:
        self.done()
        self._read_back.finish()


_ANNOUNCE_BYTES = 1 << 20


class _Plan:
    """Which names are stored and which are tied aliases of a stored one.

    Tied names are stored once; the others are recorded as aliases of the stored one (in the
    safetensors metadata), so that reading the file back through ckptsurgery re-ties them.
    """

    def __init__(self, src: Checkpoint, names: Sequence[tuple[str, str]]) -> None:
        stored_as: dict[str, str] = {}  # source canonical name -> output name that stores it
        self.items: list[tuple[str, str]] = []  # (new, old) actually stored
        self.aliases: dict[str, str] = {}  # new alias -> new stored name
        for new, old in names:
            canon = src.canonical(old)
            if canon in stored_as:
                self.aliases[new] = stored_as[canon]
            else:
                stored_as[canon] = new
                self.items.append((new, old))
        self.old_of = dict(self.items)

    def infos(self, src: Checkpoint) -> list[tuple[str, TensorInfo]]:
        return [(new, src.infos[old]) for new, old in self.items]


def _copier(src: Checkpoint, plan: _Plan, work: _SourceWork) -> Callable[[str, BinaryIO], int]:
    """``write_data(new, f)`` for :func:`stf.write_file`: copies the tensor stored as ``new``;
    verifying, records the CRC-32 of its bytes in ``work.expected``: the source's own record
    CRC when it has one (see :class:`_SourceWork`), else computed on the way while the bytes
    are in cache, unless a pass over the source hashes them (``work.tapped``)."""
    crcs = work.expected.crcs if work.expected is not None else None

    def write_data(new: str, f: BinaryIO) -> int:
        old = plan.old_of[new]
        if crcs is None or old in work.tapped:
            return src.write_data(old, f)
        known = src.record_crc(old)
        if known is not None:
            crcs[new] = known
            return src.write_data(old, f)
        tracker = CrcWriter(f)
        n = src.write_data(old, cast(BinaryIO, tracker))
        crcs[new] = tracker.crc
        return n

    return write_data


def _tracked(f: BinaryIO, progress: ProgressCallback | None, total: int) -> BinaryIO:
    return f if progress is None else cast(BinaryIO, ProgressWriter(f, progress, total))


def _shard_metadata(metadata: Mapping[str, str], aliases: Mapping[str, str]) -> dict[str, str]:
    meta = {"format": "pt", **metadata}
    if aliases:
        meta[stf.ALIASES_KEY] = json.dumps(dict(aliases), separators=(",", ":"))
    return meta


def _write_safetensors(
    f: BinaryIO,
    src: Checkpoint,
    plan: _Plan,
    metadata: Metadata,
    work: _SourceWork,
    announce: Callable[[str, int, int], None] | None = None,
) -> tuple[int, Callable[[], None]]:
    """Header (late metadata as placeholders) and data; returns the count of stored tensors
    and what completes the header once the late metadata is known."""
    items = plan.infos(src)
    start = f.tell()
    src.will_read([plan.old_of[new] for new, _ in stf.data_layout(items)])
    first = _shard_metadata(_placeholders(metadata), plan.aliases)
    written = stf.write_file(f, items, _copier(src, plan, work), first, written=announce)

    def finish() -> None:
        final = _shard_metadata(_resolved(metadata), plan.aliases)  # may wait for a digest
        if final != first:
            size = written - sum(info.nbytes for _, info in items)  # the header's, as written
            stf.rewrite_header(f, items, final, size=size, start=start)

    return len(items), finish


def _write_sharded(
    path: Path,
    src: Checkpoint,
    plan: _Plan,
    metadata: Metadata,
    max_shard_size: int,
    overwrite: bool,
    progress: ProgressCallback | None,
    total: int,
    work: _SourceWork,
) -> WriteResult:
    from ckptsurgery.io.sharded import index_json, index_layout, plan_shards, shard_names

    folder, index_name = index_layout(path)
    shards = plan_shards(plan.infos(src), max_shard_size)
    files = shard_names(index_name, len(shards))
    weight_map: dict[str, str] = {}
    shard_aliases: list[dict[str, str]] = []
    counter: ProgressWriter | None = None
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        for items, name in zip(shards, files, strict=True):
            stored = {new for new, _ in items}
            aliases = {a: c for a, c in plan.aliases.items() if c in stored}
            shard_aliases.append(aliases)
            with open(tmp / name, "xb") as raw:
                f: BinaryIO = raw
                if progress is not None:  # one count across the shards
                    done = counter.done if counter is not None else 0
                    counter = ProgressWriter(raw, progress, total)
                    counter.done = done
                    f = cast(BinaryIO, counter)
                stf.write_file(
                    f,
                    items,
                    _copier(src, plan, work),
                    _shard_metadata(_placeholders(metadata), aliases),
                )
            weight_map.update((new, name) for new, _ in items)
        for name in files:  # to disk while the helper threads finish
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        work.join_checks()
        first, final = _placeholders(metadata), _resolved(metadata)  # may wait for a digest
        size = 0
        for items, name, aliases in zip(shards, files, shard_aliases, strict=True):
            with open(tmp / name, "r+b") as f:
                if final != first:
                    reserved = len(stf.encode_header(items, _shard_metadata(first, aliases))[0])
                    stf.rewrite_header(f, items, _shard_metadata(final, aliases), size=reserved)
                    f.flush()
                    os.fsync(f.fileno())
                size += f.seek(0, os.SEEK_END)
        total_size = sum(info.nbytes for items in shards for _, info in items)
        index = index_json(weight_map, total_size)
        with open(tmp / index_name, "xb") as f:
            f.write(index)
            f.flush()
            os.fsync(f.fileno())
        size += len(index)
        if work.expected is not None:
            work.verify(tmp / index_name, folder, None)
    stored_count = sum(len(items) for items in shards)
    return WriteResult(folder, "safetensors", len(plan.items) + len(plan.aliases), stored_count,
                       size, shards=len(shards))  # fmt: skip


def _write_torch(
    f: BinaryIO,
    src: Checkpoint,
    names: Sequence[tuple[str, str]],
    work: _SourceWork,
    announce: Callable[[str, int, int], None] | None = None,
) -> int:
    from ckptsurgery.io.torchzip import can_write_torch_zip, write_torch_zip

    crcs = work.expected.crcs if work.expected is not None else None
    if can_write_torch_zip([src.infos[old] for _, old in names]):
        return write_torch_zip(f, src, names, crcs=crcs, written=announce)
    return _torch_save(f, src, names, crcs)


def _torch_save(
    f: BinaryIO, src: Checkpoint, names: Sequence[tuple[str, str]], crcs: dict[str, int] | None
) -> int:
    """Through ``torch.save``, for dtypes the archive writer does not know (every tensor
    is then in memory at once)."""
    import torch

    made: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    storage_dtypes: dict[int, torch.dtype] = {}
    for new, old in names:
        canon = src.canonical(old)
        if canon not in made:
            t = own_storage(src.tensor(canon))
            # torch.save refuses one storage viewed as two dtypes (a float and its int bits).
            ptr = t.untyped_storage().data_ptr()
            if ptr and storage_dtypes.setdefault(ptr, t.dtype) != t.dtype:
                t = t.clone()
            made[canon] = t
            if crcs is not None:  # of the values in memory: the source is not read again
                crcs[new] = crc32(tensor_bytes(t))
        out[new] = made[canon]
    torch.save(out, f)
    return len(made)


def own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it owns its whole storage, else a contiguous copy of its values.

    torch.save writes whole storages: a slice of a big tensor would drag the big tensor along,
    and a view would come back sharing memory with names it no longer has.
    """
    import torch

    t = t.detach().cpu()  # a flat state dict loads anywhere; CUDA would need map_location
    whole = (
        t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )
    if whole:
        return t
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)
