"""File-level operations shared by the library API and the CLI: load, save, remap."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ckptsurgery import __version__
from ckptsurgery._types import PathLike
from ckptsurgery.errors import IncompatibleCheckpoint, OutputError, RuleError
from ckptsurgery.io import (
    Checkpoint,
    Deferred,
    FileDigest,
    TensorDictSource,
    WriteResult,
    check_output_folder,
    check_output_path,
    identity_file,
    open_checkpoint,
    output_format,
    parse_size,
    write_checkpoint,
)
from ckptsurgery.rules import KeyPlan, Rules

if TYPE_CHECKING:
    from torch import Tensor

    from ckptsurgery.match import CheckpointLike, MatchReport
    from ckptsurgery.suggest import Suggestion


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
    verify: bool = True,
) -> WriteResult:
    """Write ``state_dict`` to ``path`` atomically (format from the extension or ``format``).

    Tensors are stored bit-exactly; tied tensors are stored once and come back tied. The file
    is read back and checked before it takes its name (``verify=False`` skips that).
    """
    fmt = output_format(path, format)
    out = check_output_path(path, force=overwrite)
    src = TensorDictSource(state_dict)
    names = [(k, k) for k in src.infos]
    meta = {"ckptsurgery.version": __version__, **(metadata or {})}
    return write_checkpoint(
        out, src, names, fmt=fmt, metadata=meta, overwrite=overwrite, verify=verify
    )


def sha256_file(path: PathLike) -> str:
    """Of the file, or of the file that identifies a folder source (its index, DCP metadata)."""
    with open(identity_file(path), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class Gate:
    """Match the result against a model before writing; refuse unless compatible.

    ``model`` is an ``nn.Module`` (or a :class:`~ckptsurgery.models.BuiltModel`), or a mapping
    of names to tensors or :class:`TensorInfo` (a reference checkpoint).
    """

    model: Any
    allow_missing: tuple[str, ...] = ()
    allow_unexpected: tuple[str, ...] = ()
    drop_mismatched: bool = False  # drop keys whose shape disagrees (they become missing)

    def check(self, result: CheckpointLike) -> MatchReport:
        """The report of what is about to be written (``result``) against the model."""
        from ckptsurgery.match import match

        return match(
            result,
            self.model,
            allow_missing=self.allow_missing,
            allow_unexpected=self.allow_unexpected,
            drop_mismatched=self.drop_mismatched,
        )

    @staticmethod
    def refuse(report: MatchReport | None, out: PathLike | None) -> None:
        """Raise :class:`IncompatibleCheckpoint` unless ``report`` (if any) is compatible."""
        if report is not None and not report.compatible:
            raise IncompatibleCheckpoint(
                f"refusing to write {str(out)!r}: the result does not fit the model "
                f"({report.problems()})",
                report=report,
            )


@dataclass(frozen=True)
class RemapResult:
    plan: KeyPlan
    source_keys: int  # keys in the source state dict
    source_key: str | None  # where the state dict was found inside the source
    other_entries: dict[str, str]  # the source's other top-level entries
    report: MatchReport | None  # the gate's report, when a gate was given
    written: WriteResult | None  # None for a dry run

    @property
    def compatible(self) -> bool:
        return self.report is None or self.report.compatible


def remap(
    src: PathLike,
    out: PathLike | None,
    rules: Rules,
    *,
    key: str | None = None,
    format: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    gate: Gate | None = None,
    allow_globals: tuple[str, ...] | list[str] = (),
    unsafe_pickle: bool = False,
    max_shard_size: int | str | None = None,
    progress: bool | None = None,
    verify: bool = True,
) -> RemapResult:
    """Apply ``rules`` to the checkpoint at ``src`` and write the result to ``out``.

    The output is checked (format, existence, not an input) before anything is read, so a
    mistake costs nothing. With ``gate`` the renamed keys are matched against a model first
    and nothing is written unless they fit (:class:`IncompatibleCheckpoint`, carrying the
    report). With ``dry_run`` only the plan (and the gate's report) is made; ``out`` may then
    be None. With ``max_shard_size`` (``"5GB"``, ``"2GiB"`` or bytes), ``out`` is a folder
    (or its ``*.safetensors.index.json``) receiving safetensors shards and their index.
    The output is read back and checked (names, shapes, dtypes, a CRC-32 of each tensor's
    bytes) before it takes its name; ``verify=False`` skips that.
    """
    fmt = None
    if out is not None:
        fmt = output_format(out, format, sharded=max_shard_size is not None)
        if max_shard_size is not None:
            parse_size(max_shard_size)
            check_output_folder(out, inputs=[src], force=force or dry_run)
        else:
            check_output_path(out, inputs=[src], force=force or dry_run)
    elif not dry_run:
        raise OutputError("no output given; pass an output path (only a dry run may omit it)")
    with open_checkpoint(
        src, key=key, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
    ) as ckpt:
        plan = rules.plan(ckpt.infos)
        report = None
        if gate is not None:
            report = gate.check({new: ckpt.infos[old] for old, new in plan.renames})
            plan = plan.without(
                (m.key for m in report.dropped_mismatched), reason="--drop-mismatched"
            )
        result = RemapResult(plan, len(ckpt.infos), ckpt.key, ckpt.other_entries, report, None)
        if dry_run:
            return result
        Gate.refuse(report, out)
        if not plan.renames:
            raise RuleError("the rules drop every key; there is nothing to write")
        assert out is not None and fmt is not None  # checked above
        written = write_remapped(
            ckpt,
            plan,
            rules,
            out,
            fmt=fmt,
            overwrite=force,
            max_shard_size=max_shard_size,
            progress=progress,
            verify=verify,
        )
    return replace(result, written=written)


@dataclass(frozen=True)
class DiffResult:
    report: MatchReport
    suggestion: Suggestion | None
    source_key: str | None
    other_entries: dict[str, str]


def diff(
    src: PathLike,
    target: Any,
    *,
    key: str | None = None,
    target_key: str | None = None,
    allow_missing: tuple[str, ...] | list[str] = (),
    allow_unexpected: tuple[str, ...] | list[str] = (),
    suggest: bool = False,
    allow_globals: tuple[str, ...] | list[str] = (),
    unsafe_pickle: bool = False,
) -> DiffResult:
    """Dry-run match of the checkpoint at ``src`` against ``target``; no tensor data is read.

    ``target`` is a model (``nn.Module`` or ``BuiltModel``) or the path of a reference
    checkpoint (``target_key`` selects its state dict). With ``suggest``, also infer the rules
    that would make the most keys match.
    """
    from ckptsurgery.loading import tie_groups
    from ckptsurgery.match import match
    from ckptsurgery.suggest import suggest as suggest_rules

    trust = {"allow_globals": tuple(allow_globals), "unsafe_pickle": unsafe_pickle}
    with open_checkpoint(src, key=key, **trust) as ckpt:  # type: ignore[arg-type]
        if isinstance(target, str | os.PathLike):
            with open_checkpoint(target, key=target_key, **trust) as ref:  # type: ignore[arg-type]
                target_shapes = {k: i.shape for k, i in ref.infos.items()}
                target_ties = tie_groups(ref)
                report = match(
                    ckpt, ref, allow_missing=allow_missing, allow_unexpected=allow_unexpected
                )
        else:
            module = getattr(target, "module", target)  # a BuiltModel or a module
            target_shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            target_ties = tie_groups(target)
            report = match(
                ckpt, target, allow_missing=allow_missing, allow_unexpected=allow_unexpected
            )
        suggestion = None
        if suggest:
            suggestion = suggest_rules(
                {k: i.shape for k, i in ckpt.infos.items()}, target_shapes, ties=target_ties
            )
        return DiffResult(report, suggestion, ckpt.key, ckpt.other_entries)


def write_remapped(
    ckpt: Checkpoint,
    plan: KeyPlan,
    rules: Rules,
    out: PathLike,
    *,
    fmt: str,
    overwrite: bool = True,
    max_shard_size: int | str | None = None,
    progress: bool | None = None,
    verify: bool = True,
) -> WriteResult:
    """Write the tensors ``plan`` keeps, under their new names, with provenance metadata.

    Pass ``overwrite=False`` unless the user forced it: a file that appears at ``out`` after
    :func:`check_output_path` looked is then left alone.
    """
    names = [(new, old) for old, new in plan.renames]
    options: dict[str, Any] = {
        "overwrite": overwrite,
        "progress": progress,
        "max_shard_size": None if max_shard_size is None else parse_size(max_shard_size),
        "verify": verify,
    }
    if fmt != "safetensors":  # a torch output is a flat state dict: no room for metadata
        return write_checkpoint(out, ckpt, names, fmt=fmt, **options)
    # The source is hashed on a helper thread while the tensors are copied; the header is
    # written with a placeholder of the digest's length and completed at the end.
    digest = FileDigest(identity_file(ckpt.path))

    def sources(sha256: str) -> str:
        entry = {"name": ckpt.path.name, "sha256": sha256, "key": ckpt.key}
        return json.dumps([entry], separators=(",", ":"))

    metadata: dict[str, str | Deferred] = {
        "ckptsurgery.version": __version__,
        "ckptsurgery.sources": Deferred(sources("0" * 64), lambda: sources(digest.hexdigest())),
        "ckptsurgery.rules": rules.to_json(),
    }
    return write_checkpoint(out, ckpt, names, fmt=fmt, metadata=metadata, **options)
