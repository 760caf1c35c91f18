"""A progress line for long writes: bytes written, on stderr, redrawn in place with ``\\r``.

Shown for writes of at least :data:`AUTO_MIN_BYTES` when stderr is a terminal, or whenever
asked for (``--progress``); never otherwise, so that logs and pipes stay clean.
"""

from __future__ import annotations

import sys
import time
from typing import BinaryIO, TextIO

AUTO_MIN_BYTES = 256 * 1024 * 1024
_INTERVAL = 0.2  # seconds between redraws


def wanted(total: int, progress: bool | None, stream: TextIO | None = None) -> bool:
    """``progress`` True/False forces it; None shows it for a big write on a terminal."""
    if progress is not None:
        return progress
    stream = stream or sys.stderr
    return total >= AUTO_MIN_BYTES and bool(getattr(stream, "isatty", lambda: False)())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """Counts bytes as they are written and redraws one line at most every 0.2 s."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= _INTERVAL:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = self.done / max(now - self.start, 1e-9)
        self.stream.write(
            f"\r{self.label} [{bar}] {frac:6.1%} {_human(self.done)} / {_human(self.total)} "
            f"{_human(rate)}/s "
        )
        self.stream.flush()

    def finish(self) -> None:
        self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()


class ProgressWriter:
    """A file wrapper that reports every write to a :class:`Progress`; seeks pass through
    (a zip record's CRC or a late safetensors header is patched in place)."""

    def __init__(self, f: BinaryIO, progress: Progress) -> None:
        self._f = f
        self._progress = progress

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = self._f.write(data)
        self._progress.advance(len(memoryview(data).cast("B")))
        return n

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()
