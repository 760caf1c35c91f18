"""Progress of a long write, reported to a callback: ``progress(bytes_done, bytes_total)``.

The library never draws anything: the command line turns the callback into a progress bar
(:mod:`ckptsurgery.render.progress`), only when stderr is a terminal or when asked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

ProgressCallback = Callable[[int, int], None]


class ProgressWriter:
    """A file wrapper that reports the bytes written so far to ``callback``; seeks pass
    through (a zip record's CRC or a late safetensors header is patched in place)."""

    def __init__(self, f: BinaryIO, callback: ProgressCallback, total: int) -> None:
        self._f = f
        self._callback = callback
        self.total = total
        self.done = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = self._f.write(data)
        self.done += len(memoryview(data).cast("B"))
        self._callback(min(self.done, self.total), self.total)
        return n

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()
