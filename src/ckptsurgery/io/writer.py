"""Writing a checkpoint: safetensors or a flat torch state dict, bit-exact and atomic."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ckptsurgery._types import PathLike
from ckptsurgery.errors import OutputError
from ckptsurgery.io import safetensors_format as stf
from ckptsurgery.io.atomic import atomic_write
from ckptsurgery.io.reader import ALIASES_KEY, Checkpoint

if TYPE_CHECKING:
    import torch

FORMATS = ("safetensors", "torch")
_EXTENSIONS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch"}


def output_format(path: PathLike, fmt: str | None) -> str:
    """The output format: ``fmt`` when given, else from the extension."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise OutputError(f"unknown output format {fmt!r}; use safetensors or torch")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    raise OutputError(
        f"cannot tell the output format from {Path(path).name!r}; use a .safetensors, .pt, "
        ".pth or .bin name, or pass --format safetensors|torch"
    )


@dataclass(frozen=True)
class WriteResult:
    path: Path
    format: str
    tensors: int  # names written (tied aliases included)
    stored: int  # tensors whose data was written (tied aliases stored once)
    bytes: int  # size of the file


def write_checkpoint(
    path: PathLike,
    src: Checkpoint,
    names: Sequence[tuple[str, str]],
    *,
    fmt: str,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
) -> WriteResult:
    """Write ``src``'s tensors under new names (``names`` = (new, old) pairs) atomically.

    ``path`` must already have been checked (:func:`check_output_path`); this only writes.
    With ``overwrite=False``, a file that appears at ``path`` meanwhile is not replaced.
    """
    path = Path(path)
    try:
        with atomic_write(path, overwrite=overwrite) as f:
            if fmt == "safetensors":
                stored = _write_safetensors(f, src, names, metadata or {})
            else:
                stored = _write_torch(f, src, names)
            size = f.tell()
    except OSError as e:
        raise OutputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    return WriteResult(path, fmt, len(names), stored, size)


def _write_safetensors(
    f: BinaryIO, src: Checkpoint, names: Sequence[tuple[str, str]], metadata: Mapping[str, str]
) -> int:
    # Tied names are stored once; the others are recorded as aliases of the stored one, so
    # that reading the file back through ckptsurgery re-ties them.
    stored_as: dict[str, str] = {}  # source canonical name -> output name that stores it
    items: list[tuple[str, str]] = []  # (new, old) actually stored
    aliases: dict[str, str] = {}
    for new, old in names:
        canon = src.canonical(old)
        if canon in stored_as:
            aliases[new] = stored_as[canon]
        else:
            stored_as[canon] = new
            items.append((new, old))
    meta = {"format": "pt", **metadata}
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases, separators=(",", ":"))
    old_of = dict(items)
    stf.write_file(
        f,
        [(new, src.infos[old]) for new, old in items],
        lambda new, out: src.write_data(old_of[new], out),
        meta,
    )
    return len(items)


def _write_torch(f: BinaryIO, src: Checkpoint, names: Sequence[tuple[str, str]]) -> int:
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
