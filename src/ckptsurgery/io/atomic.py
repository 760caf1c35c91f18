"""Atomic output: a file appears complete under its name, or not at all."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from ckptsurgery._types import PathLike
from ckptsurgery.errors import OutputError


def check_output_path(out: PathLike, *, inputs: Iterable[PathLike] = (), force: bool) -> Path:
    """Refuse an output that is one of the inputs, exists without ``force``, or cannot be made."""
    out = Path(out)
    for src in inputs:
        for part in _input_files(Path(src)):
            if _same_file(out, part):
                what = "the input" if part == Path(src) else f"{str(part)!r}, part of the input"
                raise OutputError(
                    f"output {str(out)!r} is {what} {str(src)!r}; write to another path "
                    "(sources are never modified, even with --force)"
                )
    if out.is_dir():
        raise OutputError(f"output {str(out)!r} is a directory; give a file name")
    if out.exists() and not force:
        raise OutputError(f"output {str(out)!r} already exists; pass --force to replace it")
    _check_parent(out)
    return out


def _check_parent(out: Path) -> None:
    """Refuse an output whose folder does not exist or cannot take a new entry."""
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(f"output folder {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {str(parent)!r} is not writable")


def _input_files(src: Path) -> list[Path]:
    """The files a source reads: itself, or those of its folder (shards, DCP data files)."""
    folder = src if src.is_dir() else src.parent if src.name.endswith(".index.json") else None
    if folder is None:
        return [src]
    try:
        return [src, *(p for p in folder.iterdir() if not p.is_dir())]
    except OSError:
        return [src]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def atomic_write(
    path: PathLike, *, overwrite: bool = True, check: Callable[[Path], None] | None = None
) -> Iterator[BinaryIO]:
    """Yield a temporary file beside ``path``; on success it replaces ``path`` atomically.

    The temporary file lives in the destination folder (so ``os.replace`` is a rename within
    one file system), is flushed and fsync'd before the rename, and is removed on any failure,
    KeyboardInterrupt included. With ``overwrite=False`` a file that appeared at ``path``
    while writing (another run, another user) is left alone and :class:`OutputError` raised.
    ``check(tmp)`` runs on the complete, closed temporary file just before the rename: when it
    raises, nothing takes ``path``'s name (a previous file there stays as it was).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"cannot create a file in {str(path.parent)!r}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            with _early_writeback(f.fileno()):
                yield f
                f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
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


_WRITEBACK_STEP = 128 * 1024 * 1024  # bytes written between two flushes to the disk
_WRITEBACK_POLL = 0.2  # seconds between two looks at the file's size


@contextlib.contextmanager
def _early_writeback(fd: int) -> Iterator[None]:
    """While a big file is written, flush what is written so far to the disk on a helper
    thread (``fdatasync`` every 128 MiB), so that the disk writes alongside the copy instead
    of all at the final ``fsync``. Errors are left to that final ``fsync`` to report."""
    import threading

    done = threading.Event()

    def run() -> None:
        flushed = 0
        while not done.wait(_WRITEBACK_POLL):
            try:
                size = os.fstat(fd).st_size
                if size - flushed >= _WRITEBACK_STEP:
                    os.fdatasync(fd)
                    flushed = size
            except OSError:
                return

    helper = threading.Thread(target=run, name="writeback", daemon=True)
    helper.start()
    try:
        yield
    finally:
        done.set()
        helper.join()


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


# --- folders (sharded output) ---------------------------------------------------------------

# What a previous sharded output may hold: replacing a folder with --force never deletes
# anything else (a config.json, a README, a tokenizer) along with it.
_CHECKPOINT_FILE = re.compile(r".+\.(safetensors|bin|pt|pth|index\.json)")


def check_output_folder(folder: PathLike, *, inputs: Iterable[PathLike] = (), force: bool) -> Path:
    """Refuse a sharded output folder that holds an input, holds anything but a previous
    checkpoint, exists without ``force``, or cannot be made.

    ``folder`` may also be given as the index file to write inside it; the folder is returned.
    """
    from ckptsurgery.io.sharded import index_layout

    folder, _ = index_layout(Path(folder))
    target = folder.resolve()
    for src in inputs:
        src_path = Path(src).resolve()
        if src_path == target or target in src_path.parents:
            raise OutputError(
                f"output folder {str(folder)!r} holds the input {str(src)!r}; write to another "
                "folder (sources are never modified, even with --force)"
            )
    if folder.is_symlink():
        # the folder is replaced by a rename: a link would be replaced, not what it points to
        raise OutputError(f"output {str(folder)!r} is a symbolic link; give the folder itself")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output {str(folder)!r} is a file; a sharded output is a folder")
    if folder.is_dir():
        entries = sorted(p.name for p in folder.iterdir())
        if entries and not force:
            raise OutputError(
                f"output folder {str(folder)!r} already exists; pass --force to replace it"
            )
        others = [n for n in entries if not _CHECKPOINT_FILE.fullmatch(n)]
        if others:
            raise OutputError(
                f"output folder {str(folder)!r} holds {others[0]!r}, which is not a checkpoint "
                "file; replacing the folder would delete it, so give a new folder"
            )
        for name in entries:
            if (folder / name).is_dir():
                raise OutputError(f"output folder {str(folder)!r} holds a folder {name!r}")
    _check_parent(folder)
    return folder


@contextlib.contextmanager
def atomic_folder(folder: PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``folder``; on success it becomes ``folder``.

    The caller writes (and fsyncs) its files inside. The temporary folder then takes the
    name in one rename; an existing ``folder`` (checked by :func:`check_output_folder`) is
    swapped out atomically where the kernel can (``renameat2(RENAME_EXCHANGE)``), else
    renamed aside first, and deleted. Any failure removes the temporary folder.
    """
    folder = Path(folder)
    try:
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    except OSError as e:
        raise OutputError(
            f"cannot create a folder in {str(folder.parent)!r}: {e.strerror}"
        ) from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
        _fsync_dir(tmp)
        if not os.path.lexists(folder):
            if not _renameat2(tmp, folder, _RENAME_NOREPLACE):
                if os.path.lexists(folder):
                    raise _appeared(folder)
                os.rename(tmp, folder)
        elif not overwrite and any(folder.iterdir()):
            raise _appeared(folder)
        elif _renameat2(tmp, folder, _RENAME_EXCHANGE):
            shutil.rmtree(tmp)  # the previous folder, now under the temporary name
        else:
            aside = Path(
                tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old")
            )
            os.rename(folder, aside / folder.name)
            os.rename(tmp, folder)
            shutil.rmtree(aside)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(folder.parent)


def _appeared(folder: Path) -> OutputError:
    return OutputError(
        f"output {str(folder)!r} appeared while it was being written; pass --force to replace it"
    )


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux's renameat2; False where the kernel, file system or libc lacks it."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    if err == errno.EEXIST:
        raise _appeared(dst)
    raise OSError(err, os.strerror(err), str(dst))
