"""File-level operations shared by the library API and the CLI: load, save, remap."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptsurgery import __version__
from ckptsurgery._types import PathLike
from ckptsurgery.io import (
    Checkpoint,
    TensorDictSource,
    WriteResult,
    check_output_path,
    open_checkpoint,
    output_format,
    write_checkpoint,
)
from ckptsurgery.rules import KeyPlan, Rules

if TYPE_CHECKING:
    from torch import Tensor


def load_state_dict(
    path: PathLike,
    key: str | None = None,
    *,
    allow_globals: tuple[str, ...] | list[str] = (),
    unsafe_pickle: bool = False,
) -> dict[str, Tensor]:
    """The state dict stored in ``path`` (torch or safetensors), loaded weights-only.

    Nested state dicts are found as the CLI finds them; ``key="a/b"`` picks one. Tied tensors
    come back as one tensor under several names.
    """
    with open_checkpoint(
        path, key=key, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
    ) as ckpt:
        sd = ckpt.state_dict()
    return sd


def save_state_dict(
    state_dict: Mapping[str, Tensor],
    path: PathLike,
    *,
    format: str | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
) -> WriteResult:
    """Write ``state_dict`` to ``path`` atomically (format from the extension or ``format``).

    Tensors are stored bit-exactly; tied tensors are stored once and come back tied.
    """
    fmt = output_format(path, format)
    out = check_output_path(path, force=overwrite)
    src = TensorDictSource(state_dict)
    names = [(k, k) for k in src.infos]
    meta = {"ckptsurgery.version": __version__, **(metadata or {})}
    return write_checkpoint(out, src, names, fmt=fmt, metadata=meta, overwrite=overwrite)


def sha256_file(path: PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class RemapResult:
    plan: KeyPlan
    written: WriteResult | None  # None for a dry run


def remap(
    src: PathLike,
    out: PathLike,
    rules: Rules,
    *,
    key: str | None = None,
    format: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    allow_globals: tuple[str, ...] | list[str] = (),
    unsafe_pickle: bool = False,
) -> RemapResult:
    """Apply ``rules`` to the checkpoint at ``src`` and write the result to ``out``.

    The output is checked (format, existence, not an input) before anything is read, so a
    mistake costs nothing; with ``dry_run`` only the plan is made.
    """
    fmt = output_format(out, format)
    out_path = check_output_path(out, inputs=[src], force=force or dry_run)
    with open_checkpoint(
        src, key=key, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
    ) as ckpt:
        plan = rules.plan(ckpt.infos)
        if dry_run:
            return RemapResult(plan, None)
        written = write_remapped(ckpt, plan, rules, out_path, fmt=fmt, overwrite=force)
    return RemapResult(plan, written)


def write_remapped(
    ckpt: Checkpoint,
    plan: KeyPlan,
    rules: Rules,
    out: PathLike,
    *,
    fmt: str,
    overwrite: bool = True,
) -> WriteResult:
    """Write the tensors ``plan`` keeps, under their new names, with provenance metadata.

    Pass ``overwrite=False`` unless the user forced it: a file that appears at ``out`` after
    :func:`check_output_path` looked is then left alone.
    """
    names = [(new, old) for old, new in plan.renames]
    if fmt != "safetensors":  # a torch output is a flat state dict: no room for metadata
        return write_checkpoint(out, ckpt, names, fmt=fmt, overwrite=overwrite)
    metadata = {
        "ckptsurgery.version": __version__,
        "ckptsurgery.sources": json.dumps(
            [{"name": ckpt.path.name, "sha256": sha256_file(ckpt.path), "key": ckpt.key}],
            separators=(",", ":"),
        ),
        "ckptsurgery.rules": rules.to_json(),
    }
    return write_checkpoint(out, ckpt, names, fmt=fmt, metadata=metadata, overwrite=overwrite)
