"""Open a checkpoint: names, shapes and dtypes first, tensor data one tensor at a time.

:func:`open_checkpoint` returns a :class:`Checkpoint` whose ``infos`` describe every tensor
before any tensor byte is read, and whose ``raw_bytes`` / ``write_data`` / ``tensor`` fetch one
tensor at a time. Every command goes through it. The sources:

- safetensors: the validated header (:mod:`ckptsurgery.io.safetensors_format`);
- torch zip: the archive's pickle read without torch (:mod:`ckptsurgery.io.torchzip`), or
  ``torch.load(weights_only=True, mmap=True)`` when it needs more
  (:mod:`ckptsurgery.io.torchfile`);
- legacy torch files: ``torch.load(weights_only=True)``;
- sharded checkpoints, an index and its shards (:mod:`ckptsurgery.io.sharded`);
- torch.distributed.checkpoint folders (:mod:`ckptsurgery.io.dcp`).

This module sits on top of those: it tells a file from an index from a folder and hands each
to its format (one file of a known format through :func:`~ckptsurgery.io.files.open_file`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ckptsurgery._types import PathLike
from ckptsurgery.errors import FormatError, SourceError
from ckptsurgery.io.base import Checkpoint as Checkpoint  # re-exported: callers import it here
from ckptsurgery.io.detect import SHARDED_INDEX, check_source_path, detect_format
from ckptsurgery.io.files import open_file
from ckptsurgery.io.memory import tensor_bytes as tensor_bytes  # re-exported for merge.py


def open_checkpoint(
    path: PathLike,
    *,
    key: str | None = None,
    allow_globals: tuple[str, ...] | list[str] = (),
    unsafe_pickle: bool = False,
) -> Checkpoint:
    """Open ``path`` (format recognised from its content) and select its state dict.

    ``path`` is a checkpoint file, a sharded checkpoint (its ``*.index.json`` or the folder
    holding it) or a torch.distributed.checkpoint folder.
    """
    p = Path(path)
    if p.is_dir():
        return open_folder(
            p, key=key, allow_globals=tuple(allow_globals), unsafe_pickle=unsafe_pickle
        )
    p = check_source_path(p)
    fmt = detect_format(p)
    if fmt == SHARDED_INDEX:
        from ckptsurgery.io.sharded import ShardedCheckpoint

        return ShardedCheckpoint(
            p, key=key, allow_globals=tuple(allow_globals), unsafe_pickle=unsafe_pickle
        )
    return open_file(
        p, fmt, key=key, allow_globals=tuple(allow_globals), unsafe_pickle=unsafe_pickle
    )


def open_folder(
    folder: Path, *, key: str | None, allow_globals: tuple[str, ...], unsafe_pickle: bool
) -> Checkpoint:
    """The checkpoint a folder holds: a DCP checkpoint, a sharded index, or one model file."""
    from ckptsurgery.io.sharded import INDEX_NAMES, SINGLE_NAMES, ShardedCheckpoint

    if not os.access(folder, os.R_OK | os.X_OK):
        raise SourceError(f"{str(folder)!r} is not readable (permission denied)")
    if (folder / ".metadata").is_file():
        from ckptsurgery.io.dcp import DcpCheckpoint

        return DcpCheckpoint(folder, key=key)
    trust = {"key": key, "allow_globals": allow_globals, "unsafe_pickle": unsafe_pickle}
    for name in INDEX_NAMES:
        if (folder / name).exists():
            return ShardedCheckpoint(check_source_path(folder / name), **trust)  # type: ignore[arg-type]
    indexes = sorted(p.name for p in folder.glob("*.index.json"))
    if len(indexes) == 1:
        return ShardedCheckpoint(check_source_path(folder / indexes[0]), **trust)  # type: ignore[arg-type]
    for name in SINGLE_NAMES:
        if (folder / name).exists():
            p = check_source_path(folder / name)
            return open_file(p, detect_format(p), **trust)  # type: ignore[arg-type]
    found = f" (it holds {', '.join(indexes)}: give one)" if indexes else ""
    raise SourceError(
        f"{str(folder)!r} is a directory without a checkpoint: expected {', '.join(INDEX_NAMES)}, "
        f"{', '.join(SINGLE_NAMES)} or a torch.distributed.checkpoint .metadata{found}"
    )


def identity_file(path: PathLike) -> Path:
    """The file whose bytes identify a source (for provenance): the file itself, or the
    index of a sharded folder, or a DCP folder's ``.metadata``."""
    p = Path(path)
    if not p.is_dir():
        return p
    from ckptsurgery.io.sharded import INDEX_NAMES, SINGLE_NAMES

    if (p / ".metadata").is_file():
        return p / ".metadata"
    for name in (*INDEX_NAMES, *SINGLE_NAMES):
        if (p / name).is_file():
            return p / name
    indexes = sorted(p.glob("*.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    raise FormatError(f"{str(p)!r} is a folder without a checkpoint")
