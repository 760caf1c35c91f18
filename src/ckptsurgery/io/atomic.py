"""Atomic output: a file appears complete under its name, or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from ckptsurgery._types import PathLike
from ckptsurgery.errors import OutputError


def check_output_path(out: PathLike, *, inputs: Iterable[PathLike] = (), force: bool) -> Path:
    """Refuse an output that is one of the inputs, exists without ``force``, or cannot be made."""
    out = Path(out)
    for src in inputs:
        if _same_file(out, Path(src)):
            raise OutputError(
                f"output {str(out)!r} is the input {str(src)!r}; write to another path "
                "(sources are never modified, even with --force)"
            )
    if out.is_dir():
        raise OutputError(f"output {str(out)!r} is a directory; give a file name")
    if out.exists() and not force:
        raise OutputError(f"output {str(out)!r} already exists; pass --force to replace it")
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(f"output folder {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {str(parent)!r} is not writable")
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def atomic_write(path: PathLike, *, overwrite: bool = True) -> Iterator[BinaryIO]:
    """Yield a temporary file beside ``path``; on success it replaces ``path`` atomically.

    The temporary file lives in the destination folder (so ``os.replace`` is a rename within
    one file system), is flushed and fsync'd before the rename, and is removed on any failure,
    KeyboardInterrupt included. With ``overwrite=False`` a file that appeared at ``path``
    while writing (another run, another user) is left alone and :class:`OutputError` raised.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"cannot create a file in {str(path.parent)!r}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_no_clobber(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _rename_no_clobber(tmp: str, path: Path) -> None:
    # os.replace would silently replace a file created since check_output_path looked; a hard
    # link fails atomically instead when the name is taken.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputError(
            f"output {str(path)!r} appeared while it was being written; pass --force to replace it"
        ) from None
    except OSError:  # a file system without hard links: fall back to a checked rename
        if os.path.lexists(path):
            raise OutputError(
                f"output {str(path)!r} already exists; pass --force to replace it"
            ) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk too.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
