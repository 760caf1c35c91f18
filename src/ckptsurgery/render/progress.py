"""Progress bars for the command line: the library reports ``(bytes done, bytes total)`` to a
callback, and this draws it with tqdm on stderr.

A bar is drawn when asked (``--progress``), or for a write of at least
:data:`AUTO_MIN_BYTES` when stderr is a terminal; never otherwise, so that logs and pipes
stay clean. tqdm is imported only when a bar is drawn.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

AUTO_MIN_BYTES = 256 * 1024 * 1024

__all__ = ["AUTO_MIN_BYTES", "byte_progress", "step_progress", "wanted"]


def wanted(total: int | None, progress: bool | None, stream: TextIO | None = None) -> bool:
    """``progress`` True/False forces it; None shows it for a big write on a terminal."""
    if progress is not None:
        return progress
    stream = stream or sys.stderr
    big = total is None or total >= AUTO_MIN_BYTES
    return big and bool(getattr(stream, "isatty", lambda: False)())


@contextmanager
def byte_progress(
    label: str, progress: bool | None, *, total: int | None = None, stream: TextIO | None = None
) -> Iterator[Callable[[int, int], None] | None]:
    """A ``callback(done, total)`` drawing a bar of bytes on stderr, or None when no bar is
    wanted (see :func:`wanted`); the bar is closed on the way out.

    ``total``, when known beforehand, decides whether a bar is worth drawing; otherwise the
    first call decides.
    """
    if progress is False or (total is not None and not wanted(total, progress, stream)):
        yield None
        return
    bar: Any = None
    decided = False

    def update(done: int, total_now: int) -> None:
        nonlocal bar, decided
        if not decided:
            decided = True
            if not wanted(total_now, progress, stream):
                return
            from tqdm import tqdm

            bar = tqdm(
                total=total_now,
                desc=label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=stream or sys.stderr,
                leave=True,
                dynamic_ncols=True,
            )
        if bar is not None:
            bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


@contextmanager
def step_progress(
    progress: bool | None, *, stream: TextIO | None = None
) -> Iterator[Callable[[int, int, int, int, float], None] | None]:
    """A ``callback(epoch, epochs, step, steps, loss)`` drawing one tqdm bar per training epoch
    (steps, rate, time left, the batch loss), cleared when the epoch ends so that the epoch's
    line follows; None when no bar is wanted (``progress`` False, or None and stderr is not a
    terminal)."""
    stream = stream or sys.stderr
    if not (progress if progress is not None else getattr(stream, "isatty", lambda: False)()):
        yield None
        return
    bar: Any = None
    current = 0

    def update(epoch: int, epochs: int, step: int, steps: int, loss: float) -> None:
        nonlocal bar, current
        if bar is None or epoch != current:
            if bar is not None:
                bar.close()
            from tqdm import tqdm

            current = epoch
            bar = tqdm(
                total=steps,
                desc=f"epoch {epoch}/{epochs}" if epochs else f"epoch {epoch}",
                unit="step",
                file=stream,
                leave=False,
                dynamic_ncols=True,
                mininterval=0,  # the trainer reports at most 10 steps a second already
            )
        bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
        bar.update(step - bar.n)
        if step == steps:  # the epoch's line comes next
            bar.close()
            bar = None

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()
