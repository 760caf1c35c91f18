"""Moving bytes between files through one small buffer, and file windows.

Copies go through a plain read/write loop. Its buffer is small on purpose: 128 KiB stays in
the CPU's L2 cache between the read and the write, and on the 2-core target machine (512 KiB
of L2 per core, other processes busy) that loop kept pace with ``cp`` (median 1.0-1.2x)
where an 8 MiB buffer took 2-3x as long and twice the system time, and
``os.copy_file_range`` from a non-zero offset was 1.4-1.5x slower. The CRC-32 of what passes
is computed on the way, while the bytes are still in cache (zip records).
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import BinaryIO

from ckptsurgery.errors import FormatError
from ckptsurgery.io.checksums import DIGEST, Digest, crc32, new_digest

COPY_BUFFER = 128 * 1024  # bytes moved per read/write when copying tensor data


def copy_range(
    src: BinaryIO,
    begin: int,
    length: int,
    out: BinaryIO,
    *,
    what: str,
    crc: int | None = None,
) -> int | None:
    """Copy ``length`` bytes of ``src`` from ``begin`` to ``out``.

    With ``crc`` (a running CRC-32, 0 to start), return the CRC-32 of the bytes copied;
    else None. ``what`` names the data in the error raised when ``src`` ends early.
    """
    buf = bytearray(min(COPY_BUFFER, length))
    view = memoryview(buf)
    src.seek(begin)
    remaining = length
    while remaining:
        n = src.readinto(view[: min(len(buf), remaining)])  # type: ignore[attr-defined]
        if not n:
            raise FormatError(f"{what} is cut short (truncated file?)")
        chunk = view[:n]
        if crc is not None:
            crc = crc32(chunk, crc)
        out.write(chunk)
        remaining -= n
    return crc


def read_range(src: BinaryIO, begin: int, length: int, *, what: str) -> bytearray:
    """``length`` bytes of ``src`` from ``begin``, in a buffer of their own.

    A file with a descriptor is read with ``pread``, which leaves its position alone, so a
    read-ahead thread may read tensors while the writer streams others from the same file.
    """
    buf = bytearray(length)
    if not length:
        return buf
    try:
        fd = src.fileno()
    except (OSError, AttributeError, ValueError):
        fd = -1
    if fd < 0:
        src.seek(begin)
        if src.readinto(buf) != length:  # type: ignore[attr-defined]
            raise FormatError(f"{what} is cut short (truncated file?)")
        return buf
    view, done = memoryview(buf), 0
    while done < length:
        n = os.preadv(fd, [view[done:]], begin + done)
        if not n:
            raise FormatError(f"{what} is cut short (truncated file?)")
        done += n
    return buf


def crc_of_range(src: BinaryIO | int, begin: int, length: int, *, what: str) -> int:
    """The CRC-32 of ``length`` bytes of ``src`` from ``begin`` (through a memory map)."""
    crc = [0]

    def update(data: memoryview) -> None:
        crc[0] = crc32(data, crc[0])

    if length:
        scan_mapped(src, begin, length, update, what=what)
    return crc[0]


def crcs_of_spans(
    src: BinaryIO, spans: Iterable[tuple[str, int, int]], *, what: str
) -> dict[str, int]:
    """The CRC-32 of each ``(name, begin, length)`` byte range of ``src``, in a forward pass:
    small ranges (most tensors of a checkpoint, by count) share one read of up to 8 MiB, a
    bigger one is hashed in place through a memory map. A big file is split in two halves
    hashed on two threads (zlib releases the GIL), when there are two cores to run them."""
    ordered = sorted(spans, key=lambda s: s[1])
    fd = src.fileno()
    total = sum(length for _, _, length in ordered)
    if total < _PARALLEL_BYTES or (os.cpu_count() or 1) < 2:
        return _crcs_in_order(fd, ordered, what=what)
    half, cut = 0, len(ordered)
    for i, (_, _, length) in enumerate(ordered):
        if half >= total // 2:
            cut = i
            break
        half += length
    second: dict[str, int] = {}
    failure: list[BaseException] = []

    def run() -> None:
        try:
            second.update(_crcs_in_order(fd, ordered[cut:], what=what))
        except BaseException as e:  # handed to the joining thread
            failure.append(e)

    helper = threading.Thread(target=run, name="crc", daemon=True)
    helper.start()
    try:
        out = _crcs_in_order(fd, ordered[:cut], what=what)
    finally:
        helper.join()
    if failure:
        raise failure[0]
    out.update(second)
    return out


_PARALLEL_BYTES = 64 * 1024 * 1024  # below this, a second thread costs more than it saves


def _crcs_in_order(fd: int, spans: list[tuple[str, int, int]], *, what: str) -> dict[str, int]:
    # pread, not seek + read: the two halves share the descriptor
    out: dict[str, int] = {}
    buf = bytearray(_WINDOW)
    view = memoryview(buf)
    start = end = 0  # the file range now in ``buf``
    for name, begin, length in spans:
        if length > len(buf):
            out[name] = crc_of_range(fd, begin, length, what=f"{what}: the data of {name!r}")
            continue
        if not (start <= begin and begin + length <= end):
            start, end = begin, begin + os.preadv(fd, [view], begin)
            if begin + length > end:
                raise FormatError(f"{what}: the data of {name!r} is cut short (truncated file?)")
        out[name] = crc32(view[begin - start : begin - start + length])
    return out


class CrcWriter:
    """Passes writes on to ``f`` (or nowhere, when None), keeping their CRC-32 and byte count."""

    def __init__(self, f: BinaryIO | None) -> None:
        self._f = f
        self.crc = 0
        self.count = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.crc = crc32(data, self.crc)
        n = len(memoryview(data).cast("B"))
        self.count += n
        if self._f is not None:
            self._f.write(data)
        return n

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()


class FileWindow(io.RawIOBase):
    """A read-only view of ``length`` bytes of an open file, starting at ``base``.

    A torch.distributed.checkpoint data file holds many ``torch.save`` archives end to end;
    a window lets the zip reader see one of them as a whole file.
    """

    def __init__(self, f: BinaryIO, base: int, length: int) -> None:
        super().__init__()
        self._f = f
        self._base = base
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._length + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(b), self._length - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._base + self._pos)
        got = self._f.readinto(memoryview(b)[:n])  # type: ignore[attr-defined]
        self._pos += got
        return int(got)

    def fileno(self) -> int:
        raise OSError("a file window has no descriptor of its own")


_WINDOW = 8 * 1024 * 1024  # bytes of a file mapped at once by scan_mapped


def scan_mapped(
    f: BinaryIO | int,
    begin: int,
    length: int,
    update: Callable[[memoryview], None],
    *,
    what: str,
) -> None:
    """Feed ``length`` bytes of ``f`` (a file or a descriptor) from ``begin`` to ``update``,
    window by window, through a memory map: a helper thread hashing a file this way costs the
    hash alone (no read copies the bytes first), and unmapping each window keeps the pages out
    of the peak RSS.
    """
    fd = f if isinstance(f, int) else f.fileno()
    if begin + length > os.fstat(fd).st_size:
        raise FormatError(f"{what} is cut short (truncated file?)")
    granule = mmap.ALLOCATIONGRANULARITY
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # one fault, not thousands
    pos, end = begin, begin + length
    while pos < end:
        start = pos - pos % granule
        size = min(_WINDOW, end - start)
        with mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ, offset=start) as m:
            view = memoryview(m)
            try:
                update(view[pos - start : size])
            finally:
                view.release()
        pos = start + size


class FileDigest:
    """The digest of a file (:data:`~ckptsurgery.io.checksums.DIGEST`: xxh3-128, or sha256
    without xxhash), computed on a helper thread from the moment this is made.

    Done beside the copy of the tensors (the hashers release the GIL), it costs no wall time
    while a core is free; xxh3 keeps it far ahead of the copy (10 GB/s here, sha256 1.2).

    Its pass over the file also hashes byte ranges for a writer that asks
    (:func:`tap_digest`): the CRC-32 of a range comes then from bytes already mapped, and the
    copy itself hashes nothing.
    """

    def __init__(self, path: str | os.PathLike[str], algorithm: str = DIGEST) -> None:
        self.path = path
        self.algorithm = algorithm
        self._digest: str | None = None
        self._error: OSError | None = None
        self._lock = threading.Lock()
        self._pos = 0  # bytes of the file taken by the pass so far
        self._taps: list[_SpanCrcs] = []
        self._file: BinaryIO | None = None
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - the thread closes it
            st = os.fstat(self._file.fileno())
        except OSError as e:
            self._error = OSError(f"cannot read {path}: {e}")
            self._pos = -1  # nothing to tap
        else:
            _DIGESTS_RUNNING[(st.st_dev, st.st_ino)] = self
        self._thread = threading.Thread(target=self._run, name="digest", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._file is None:
            return
        try:
            h = new_digest(self.algorithm)
            with self._file as f:
                size = os.fstat(f.fileno()).st_size
                if size:
                    with helper_turn():
                        scan_mapped(f, 0, size, partial(self._update, h), what=str(self.path))
            self._digest = h.hexdigest()
        except (OSError, ValueError, FormatError) as e:
            self._error = OSError(f"cannot read {self.path}: {e}")
        finally:
            with self._lock:
                self._pos = -1  # the pass is over: no more taps

    def _update(self, h: Digest, view: memoryview) -> None:
        with self._lock:
            begin = self._pos
            self._pos += len(view)
            taps = list(self._taps)
        h.update(view)
        for tap in taps:
            tap.feed(begin, view)

    def tap(self, spans: Iterable[tuple[str, int, int]]) -> dict[str, Callable[[], int]]:
        """The CRC-32 of each ``(name, begin, length)`` byte range that the pass has not
        reached yet, computed on its way: name -> a call returning it (waiting for the pass).
        Ranges it has passed, or all when it is over, are left out."""
        with self._lock:
            if self._pos < 0:
                return {}
            ahead = _SpanCrcs([s for s in spans if s[1] >= self._pos])
            if not ahead.spans:
                return {}
            self._taps.append(ahead)
        return {name: partial(self._tapped, ahead, name) for name, _, _ in ahead.spans}

    def _tapped(self, tap: _SpanCrcs, name: str) -> int:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return tap.crc(name, what=str(self.path))

    def hexdigest(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest


class _SpanCrcs:
    """CRC-32s of byte ranges of a file, fed its windows in order."""

    def __init__(self, spans: list[tuple[str, int, int]]) -> None:
        self.spans = sorted(spans, key=lambda s: s[1])
        self.crcs: dict[str, int] = {}
        self.fed: dict[str, int] = {}  # bytes hashed of each range
        self._next = 0  # the ranges before it are complete
        self._lengths = {name: length for name, _, length in self.spans}

    def feed(self, begin: int, view: memoryview) -> None:
        end = begin + len(view)
        i = self._next
        while i < len(self.spans) and self.spans[i][1] < end:
            name, start, length = self.spans[i]
            lo, hi = max(start, begin), min(start + length, end)
            if hi > lo:
                self.crcs[name] = crc32(view[lo - begin : hi - begin], self.crcs.get(name, 0))
                self.fed[name] = self.fed.get(name, 0) + hi - lo
            if start + length <= end and i == self._next:
                self._next += 1
            i += 1

    def crc(self, name: str, *, what: str) -> int:
        if self.fed.get(name, 0) != self._lengths[name]:
            raise FormatError(f"{what}: the data of {name!r} is cut short (truncated file?)")
        return self.crcs.get(name, 0)


_DIGESTS_RUNNING: weakref.WeakValueDictionary[tuple[int, int], FileDigest] = (
    weakref.WeakValueDictionary()
)


def tap_digest(f: BinaryIO, spans: Iterable[tuple[str, int, int]]) -> dict[str, Callable[[], int]]:
    """CRC-32s of byte ranges of the open file ``f`` from a :class:`FileDigest` pass over
    the same file, when one is under way (see :meth:`FileDigest.tap`); else empty."""
    try:
        st = os.fstat(f.fileno())
    except (OSError, AttributeError, ValueError):
        return {}
    digest = _DIGESTS_RUNNING.get((st.st_dev, st.st_ino))
    return {} if digest is None else digest.tap(spans)


_HELPER_LANE = threading.Lock()


@contextlib.contextmanager
def helper_turn() -> Iterator[None]:
    """Hashing beside a copy, one helper thread at a time: the digest of a source, the check
    of its records and the read-back of the output take turns, so that at most one of them
    competes with the copy for the second core (two at once slowed the copy itself)."""
    with _HELPER_LANE:
        yield


def lower_priority() -> None:
    """Lower the calling thread's scheduling priority by :data:`HELPER_NICE`, for helper work
    that should leave the cores to the copy and the kernel's writeback first (the read-back
    of a written file, the hashing of a source in place): it then runs on the time they
    leave idle. Linux sets a nice value per thread; elsewhere this does nothing."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):
        tid = threading.get_native_id()
        os.setpriority(
            os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + HELPER_NICE)
        )


HELPER_NICE = 10


def in_background(jobs: Sequence[Callable[[], None]]) -> Callable[[], None]:
    """Run ``jobs`` one after another on a helper thread; return the join, which re-raises
    the first job's exception (the remaining jobs are then skipped)."""
    if not jobs:
        return lambda: None
    failure: list[BaseException] = []

    def run() -> None:
        try:
            for job in jobs:
                with helper_turn():
                    job()
        except BaseException as e:  # handed to the joining thread
            failure.append(e)

    thread = threading.Thread(target=run, name="checks", daemon=True)
    thread.start()

    def join() -> None:
        thread.join()
        if failure:
            raise failure[0]

    return join
