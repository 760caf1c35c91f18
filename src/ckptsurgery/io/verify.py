"""Checking a checkpoint just written, before it takes its name.

What is checked, and when:

- **Each tensor's bytes, as the output file holds them.** The writer keeps the CRC-32 of
  every tensor it stores: the source archive's own record CRC when the bytes are copied
  whole (comparing the output with it checks the source too); for a tensor copied whole
  from a safetensors file, the CRC its digest pass takes on the way (the provenance hashes
  the file anyway); else computed from the bytes as they pass on their way out. Once a tensor is handed to the file, a :class:`ReadBack`
  thread reads that byte range back from the output (through the operating system, from a
  descriptor of its own) and hashes it: while the copy runs it trails it by up to an eighth
  of the memory (hashing beside the copy slows the copy), taking turns with the other
  hashing helpers, and the rest is hashed on two threads during the final ``fsync``, when
  the cores are idle.
- **The finished file, through the same reader every command uses** (:func:`verify_written`,
  after the final ``fsync``): its header or archive directory parses; it holds exactly the
  names, shapes, dtypes and ties meant; every tensor's data lies where the read-back hashed
  it (so the header points at the checked bytes, and the file is not short of them); and
  those hashes equal the ones kept while writing. A range the read-back did not see (shards,
  the rare ``torch.save`` fallback, a tensor whose place it did not learn) is hashed here.

What this proves: the file, as the kernel hands it to any reader, is the checkpoint that was
meant, byte for byte; a bug in a writer, a short write, a file cut short or altered between
the write and its check are caught and nothing takes the output's name. What it cannot
prove: that the disk itself stores what the kernel cached (that would take reading it back
past the page cache, at the disk's speed); the final ``fsync`` reports what the disk refused.
Memory stays flat: each range is hashed through a bounded window.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ckptsurgery.errors import CheckpointError, FormatError, OutputError
from ckptsurgery.io.checksums import crc32
from ckptsurgery.io.dtypes import TensorInfo
from ckptsurgery.io.streams import helper_turn, lower_priority

Span = tuple[str, int, int]  # (stored name, begin, length) in the output file


@dataclass
class Expected:
    """What a write meant to produce."""

    infos: dict[str, TensorInfo]  # every name, tied aliases included
    aliases: dict[str, str]  # tied name -> the name stored
    crcs: dict[str, int] = field(default_factory=dict)  # stored name -> CRC-32 of its bytes


class ReadBack:
    """Hashes tensors back from the output file on a helper thread, trailing the copy.

    ``fd`` must be open for reading (the writer's own descriptor will do: only ``pread`` and
    memory maps use it, never its offset). The writer calls :meth:`written` once a tensor's
    bytes are flushed to the file, and :meth:`finish` once the last one is, before its final
    ``fsync``; :meth:`result` waits for the hashing and returns each name's
    ``(begin, length, crc)``.

    The thread stays up to ``lag`` bytes behind the copy (:func:`read_back_lag`): hashing
    while the copy runs slows the copy (both move page-cache bytes), while the final
    ``fsync`` leaves both cores idle, so what is left then is hashed on two threads during
    it. The lag is bounded so that the pages read back are still in memory. Ranges are
    taken in batches: many small tensors share one read.
    """

    def __init__(self, fd: int, *, what: str, lag: int | None = None) -> None:
        self._fd = os.dup(fd)
        self._what = what
        self._lag = read_back_lag() if lag is None else lag
        self._queue: queue.SimpleQueue[Span | None] = queue.SimpleQueue()
        self._hashed: dict[str, tuple[int, int, int]] = {}
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._abort = False
        self.busy = 0.0  # seconds spent hashing
        self._thread = threading.Thread(target=self._run, name="read-back", daemon=True)
        self._thread.start()

    def written(self, name: str, begin: int, length: int) -> None:
        self._queue.put((name, begin, length))

    def finish(self) -> None:
        """No more ranges: hash what is left now (on two threads)."""
        self._queue.put(None)

    def _run(self) -> None:
        lower_priority()  # while it trails the copy, it runs on the time the copy leaves
        pending: collections.deque[Span] = collections.deque()
        behind = 0  # bytes written and not yet hashed
        while True:
            item = self._queue.get()
            if item is None:
                break
            pending.append(item)
            behind += item[2]
            while behind > self._lag:
                batch = [pending.popleft()]
                size = batch[0][2]
                while pending and size < _READ_BACK_BATCH:
                    size += pending[0][2]
                    batch.append(pending.popleft())
                behind -= size
                with helper_turn():  # after the source's digest, if one is being made
                    self._hash(batch)
        if not self._abort:
            self._hash_on_two(list(pending))

    def _hash_on_two(self, spans: list[Span]) -> None:
        total = sum(length for _, _, length in spans)
        if total < _PARALLEL_BYTES or (os.cpu_count() or 1) < 2:
            self._hash(spans)
            return
        spans.sort(key=lambda s: s[1])
        half = cut = 0
        while cut < len(spans) and half < total // 2:
            half += spans[cut][2]
            cut += 1
        helper = threading.Thread(target=self._hash, args=(spans[cut:],), daemon=True)
        helper.start()
        self._hash(spans[:cut])
        helper.join()

    def _hash(self, batch: list[Span]) -> None:
        if not batch or self._error is not None:
            return
        start = time.perf_counter()
        try:
            crcs = read_back(self._fd, sorted(batch, key=lambda s: s[1]), self._what)
        except BaseException as e:  # handed to the caller of result()
            self._error = e
            return
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self.busy += elapsed
        with self._lock:
            for name, begin, length in batch:
                self._hashed[name] = (begin, length, crcs[name])

    def result(self) -> dict[str, tuple[int, int, int]]:
        """Each hashed name's ``(begin, length, crc)``; re-raises the thread's error."""
        self._stop()
        if self._error is not None:
            raise self._error
        return self._hashed

    def close(self) -> None:
        """Stop, leaving what is not hashed yet (the write failed)."""
        self._abort = True
        self._stop()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_back(fd: int, spans: list[Span], what: str) -> dict[str, int]:
    """The CRC-32 of each span of the output, read back through the operating system (a seam
    for tests that damage the file between its write and this read).

    ``pread`` into one small buffer, not a memory map: mapping pages that the writer is still
    writing and flushing made the kernel write-protect and unmap them again and again, which
    slowed the copy itself by half.
    """
    buf = bytearray(_READ_BACK_BUFFER)
    view = memoryview(buf)
    out: dict[str, int] = {}
    start = end = 0  # the file range now in ``buf``: small tensors share one read

    def cut_short(name: str) -> FormatError:
        return FormatError(f"{what}: the data of {name!r} is cut short (truncated file?)")

    for name, begin, length in spans:
        if start <= begin and begin + length <= end:
            out[name] = crc32(view[begin - start : begin - start + length])
            continue
        if length <= len(buf):
            start, end = begin, begin + os.preadv(fd, [view], begin)
            if begin + length > end:
                raise cut_short(name)
            out[name] = crc32(view[:length])
            continue
        crc, pos, stop = 0, begin, begin + length
        while pos < stop:
            n = os.preadv(fd, [view[: min(len(buf), stop - pos)]], pos)
            if not n:
                raise cut_short(name)
            crc = crc32(view[:n], crc)
            pos += n
        out[name] = crc
        start = end = 0
    return out


_READ_BACK_BUFFER = 1024 * 1024
_READ_BACK_BATCH = 64 * 1024 * 1024  # bytes hashed in one go once the lag is exceeded
_PARALLEL_BYTES = 64 * 1024 * 1024  # below this, a second thread costs more than it saves


def read_back_lag() -> int:
    """How far (bytes) the read-back may trail the copy: an eighth of the memory, at most
    4 GiB, so that the pages it reads back are still cached."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        memory = 8 << 30
    return max(0, min(4 << 30, memory // 8))


def verify_written(
    path: Path,
    expected: Expected,
    *,
    out: Path,
    hashed: Mapping[str, tuple[int, int, int]] | None = None,
) -> None:
    """Re-open ``path`` (the temporary output; a folder's index for shards) and compare it
    with ``expected``; :class:`OutputError` naming ``out`` and the first difference.

    ``hashed`` holds what a :class:`ReadBack` hashed while the file was written; each of
    those tensors must lie exactly there, and the rest are hashed now.
    """
    from ckptsurgery.io.reader import open_checkpoint

    def failed(problem: str) -> OutputError:
        return OutputError(
            f"verifying {str(out)!r} after writing it failed: {problem}; nothing was written "
            "(check the disk and retry)"
        )

    try:
        ckpt = open_checkpoint(path)
    except CheckpointError as e:
        raise failed(f"it does not read back ({_short(e, path)})") from None
    with ckpt:
        _compare_names(ckpt.infos, expected.infos, failed)
        for name, info in expected.infos.items():
            got = ckpt.infos[name]
            if got.shape != info.shape or got.dtype != info.dtype:
                raise failed(
                    f"tensor {name!r} reads back as {got.dtype} {list(got.shape)}, "
                    f"{info.dtype} {list(info.shape)} was written"
                )
        for name, info in expected.infos.items():
            want = expected.aliases.get(name, name)
            # an empty tensor holds no bytes to share: readers of torch files never tie one
            if info.nbytes and ckpt.canonical(name) != want:
                raise failed(f"tensor {name!r} does not read back tied to {want!r}")
        hashed = hashed or {}
        spans = ckpt.data_spans(name for name in expected.crcs if name in hashed)
        got_crcs = {
            name: crc
            for name, (begin, length, crc) in hashed.items()
            if spans.get(name) == (begin, length)
        }
        try:
            got_crcs.update(ckpt.data_crcs(n for n in expected.crcs if n not in got_crcs))
        except CheckpointError as e:
            raise failed(_short(e, path)) from None
        for name, crc in expected.crcs.items():
            got_crc = got_crcs[name]
            if got_crc != crc:
                raise failed(
                    f"the bytes of tensor {name!r} read back with CRC-32 {got_crc:08x}, "
                    f"not the {crc:08x} written"
                )


def _compare_names(
    got: Mapping[str, TensorInfo],
    want: Mapping[str, TensorInfo],
    failed: Callable[[str], OutputError],
) -> None:
    missing = [n for n in want if n not in got]
    extra = [n for n in got if n not in want]
    if missing or extra:
        what = f"tensor {missing[0]!r} is missing" if missing else f"it holds an extra {extra[0]!r}"
        raise failed(f"{what} ({len(missing)} missing, {len(extra)} unexpected)")


def _short(e: BaseException, path: Path) -> str:
    # the temporary name means nothing to the user: the message names the output instead
    return str(e).replace(repr(str(path)), "the file").replace(str(path), "the file")
