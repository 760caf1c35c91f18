"""Merging checkpoints: the union of their keys, or their weighted elementwise mean.

Names first, tensors last. A merge is planned on key names, shapes and dtypes alone (so a dry
run reads no tensor data); its result is a :class:`~ckptsurgery.io.Checkpoint` whose tensors
are fetched only when the writer asks for them, one at a time:

- a union (:class:`UnionSource`) hands each output name to the (source, old name) it comes
  from, so tensors are copied bit-exactly;
- an average (:class:`AverageSource`) computes one tensor's weighted mean from every source
  when it is asked for that tensor, and keeps nothing: peak memory stays near one tensor per
  source, whatever the size of the checkpoints, for a safetensors or a torch output alike
  (only a torch output with a dtype that just ``torch.save`` writes holds every tensor).

Decisions:

- Union order: the first source's keys, then each later source's new keys. A key in several
  sources is a conflict: an error by default, or taken from the first / last source that has
  it (its position stays that of its first appearance).
- Averaging needs the same keys, shapes and kinds (floating, complex, integer, bool) in every
  source. Floating tensors are accumulated in float32 (float64 when any source holds float64,
  complex for complex) and stored in the first source's dtype. Integer and bool tensors
  (``num_batches_tracked``, ``position_ids``) are never averaged: they are the first source's,
  and sources that disagree on them are reported.
- Tied tensors (one storage under several names) stay tied: in a union, names tied in the
  source they come from; in an average, names tied in every source.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from ckptsurgery import __version__
from ckptsurgery._types import PathLike
from ckptsurgery.errors import CheckpointError, OutputError
from ckptsurgery.io import (
    Checkpoint,
    TensorDictSource,
    TensorInfo,
    WriteResult,
    check_output_folder,
    check_output_path,
    open_checkpoint,
    output_format,
    parse_size,
    write_checkpoint,
)
from ckptsurgery.io.reader import tensor_bytes
from ckptsurgery.keygroups import group_keys
from ckptsurgery.rules import KeyPlan, Rules

if TYPE_CHECKING:
    import torch

    from ckptsurgery.match import MatchReport
    from ckptsurgery.surgery import Gate

__all__ = [
    "ON_CONFLICT",
    "AverageSource",
    "Conflict",
    "MergeConflictError",
    "MergeError",
    "MergeResult",
    "SourceResult",
    "SourceSpec",
    "UnionSource",
    "average",
    "average_files",
    "merge",
    "merge_files",
    "normalise_weights",
]

V = TypeVar("V")

ON_CONFLICT = ("error", "first", "last")
_SHOWN = 5  # key groups named in an error message before "..."


class MergeError(CheckpointError):
    """Sources that cannot be merged or averaged as asked (key sets, shapes, weights)."""


class MergeConflictError(MergeError):
    """A key is in several sources and ``on_conflict="error"``; ``conflicts``: key -> sources."""

    def __init__(self, message: str, *, conflicts: dict[str, tuple[str, ...]]) -> None:
        super().__init__(message)
        self.conflicts = conflicts


@dataclass(frozen=True)
class SourceSpec:
    """One input of a merge: a checkpoint path, its nested state dict and its own rules."""

    path: PathLike
    key: str | None = None
    rules: Rules = field(default_factory=Rules)


@dataclass(frozen=True)
class Conflict:
    """A key that several sources hold (indices into the sources), and the one it came from."""

    key: str
    sources: tuple[int, ...]
    taken_from: int


# --- in memory ------------------------------------------------------------------------------


def merge(state_dicts: Sequence[Mapping[str, V]], *, on_conflict: str = "error") -> dict[str, V]:
    """The union of ``state_dicts``' keys, as a new dict; the inputs are left as they were.

    A key in several state dicts raises :class:`MergeConflictError` under
    ``on_conflict="error"``, or is taken from the first / last that has it under ``"first"`` /
    ``"last"``. Values are not copied: the result holds the inputs' own tensors.
    """
    labels = [f"state dict {i + 1}" for i in range(len(state_dicts))]
    entries, _ = plan_union([[(k, k) for k in sd] for sd in state_dicts], on_conflict, labels)
    return {new: state_dicts[i][old] for new, i, old in entries}


def average(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """The (weighted) elementwise mean of ``state_dicts``, as a new dict of new tensors.

    Every state dict needs the same keys and shapes (else :class:`MergeError` naming the
    differences). ``weights`` (default: equal) must be positive, one per state dict, and are
    normalised to sum 1. Floating tensors are averaged in float32 or wider and keep the first
    state dict's dtype; integer and bool tensors are the first state dict's own (a warning
    says when the others disagree). The inputs are left as they were.
    """
    if len(state_dicts) < 1:
        raise MergeError("nothing to average: give at least one state dict")
    w = normalise_weights(weights, len(state_dicts))
    sources = [
        TensorDictSource(sd, source=f"state dict {i + 1}") for i, sd in enumerate(state_dicts)
    ]
    labels = [str(s.path) for s in sources]
    renames = [[(k, k) for k in s.infos] for s in sources]
    avg = AverageSource(sources, renames, w, labels)
    out = avg.state_dict()
    for message in (*avg.notes, *avg.disagreement_notes()):
        warnings.warn(message, UserWarning, stacklevel=2)
    return out


def normalise_weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    """``weights`` scaled to sum 1 (equal weights when None or empty), or :class:`MergeError`."""
    if not weights:
        return tuple(1.0 / n for _ in range(n))
    values = list(weights)
    if len(values) != n:
        raise MergeError(
            f"{len(values)} weight{'s' if len(values) != 1 else ''} for {n} sources; give one "
            "weight per source, in the same order (or none for equal weights)"
        )
    for w in values:
        if isinstance(w, bool) or not isinstance(w, int | float):
            raise MergeError(f"weight {w!r} is not a number")
        if not math.isfinite(w) or w <= 0:
            raise MergeError(f"weight {w!r} is not a positive number; every weight must be > 0")
    total = math.fsum(values)
    return tuple(w / total for w in values)


# --- planning on names ----------------------------------------------------------------------


def plan_union(
    renames: Sequence[Sequence[tuple[str, str]]], on_conflict: str, labels: Sequence[str]
) -> tuple[list[tuple[str, int, str]], list[Conflict]]:
    """The union of the sources' (old, new) renames: ``(new, source index, old)`` entries in
    output order, and the conflicts (resolved by ``on_conflict``, or raised under "error")."""
    check_on_conflict(on_conflict)
    holders: dict[str, list[tuple[int, str]]] = {}
    for i, pairs in enumerate(renames):
        for old, new in pairs:
            holders.setdefault(new, []).append((i, old))
    entries: list[tuple[str, int, str]] = []
    conflicts: list[Conflict] = []
    for new, held in holders.items():
        i, old = held[-1] if on_conflict == "last" else held[0]
        entries.append((new, i, old))
        if len(held) > 1:
            conflicts.append(Conflict(new, tuple(j for j, _ in held), i))
    if conflicts and on_conflict == "error":
        by_sources: dict[tuple[int, ...], list[str]] = {}
        for c in conflicts:
            by_sources.setdefault(c.sources, []).append(c.key)
        shown = []
        for srcs, keys in by_sources.items():
            groups = group_keys(keys)
            more = ", ..." if len(groups) > _SHOWN else ""
            where = " and ".join(labels[i] for i in srcs)
            shown.append(f"in {where}: {', '.join(groups[:_SHOWN])}{more}")
        n = len(conflicts)
        raise MergeConflictError(
            f"{n} key{'s are' if n != 1 else ' is'} in several sources ({'; '.join(shown)}); "
            "take each from the first or last source that has it (--on-conflict first|last, "
            "on_conflict= in Python), or drop it from all but one source",
            conflicts={c.key: tuple(labels[i] for i in c.sources) for c in conflicts},
        )
    return entries, conflicts


def check_on_conflict(on_conflict: str) -> None:
    if on_conflict not in ON_CONFLICT:
        raise MergeError(f"on_conflict {on_conflict!r} is not one of {', '.join(ON_CONFLICT)}")


def _kind(dtype: str) -> str:
    if dtype == "bool":
        return "bool"
    if dtype.startswith("complex"):
        return "complex"
    if dtype.startswith(("float", "bfloat")):
        return "floating"
    return "integer"


def average_problems(infos: Sequence[Mapping[str, TensorInfo]], labels: Sequence[str]) -> list[str]:
    """What keeps these sources from being averaged: keys not in every source, shapes or kinds
    that differ. Empty when they can be."""
    n = len(infos)
    problems: list[str] = []
    everywhere = set.intersection(*(set(i) for i in infos)) if infos else set()
    by_presence: dict[tuple[int, ...], list[str]] = {}
    for key in dict.fromkeys(k for i in infos for k in i):
        if key not in everywhere:
            present = tuple(j for j in range(n) if key in infos[j])
            by_presence.setdefault(present, []).append(key)
    for present, keys in by_presence.items():
        absent = [labels[j] for j in range(n) if j not in present]
        where = (
            f"only in {' and '.join(labels[j] for j in present)}"
            if len(present) <= len(absent)
            else f"missing from {' and '.join(absent)}"
        )
        groups = group_keys(keys)
        more = ", ..." if len(groups) > _SHOWN else ""
        problems.append(
            f"{len(keys)} key{'s' if len(keys) != 1 else ''} {where} "
            f"({', '.join(groups[:_SHOWN])}{more})"
        )
    for key in (k for k in infos[0] if k in everywhere) if infos else ():
        shapes = [i[key].shape for i in infos]
        kinds = [_kind(i[key].dtype) for i in infos]
        if len(set(shapes)) > 1:
            detail = ", ".join(f"{labels[j]} {list(s)}" for j, s in enumerate(shapes))
            problems.append(f"{key} has different shapes ({detail})")
        elif len(set(kinds)) > 1:
            detail = ", ".join(f"{labels[j]} {i[key].dtype}" for j, i in enumerate(infos))
            problems.append(f"{key} cannot be averaged across dtypes ({detail})")
    return problems


# --- the merged checkpoint, fetched tensor by tensor ---------------------------------------


class _Combined(Checkpoint):
    """A checkpoint made of other open checkpoints; its names are the output names."""

    def __init__(self, names: Sequence[str], tie_key: Mapping[str, object]) -> None:
        self.path = Path("merged")
        self.format = "merge"
        self.metadata = {}
        self.other_entries = {}
        self.aliases = {}
        first_of: dict[object, str] = {}
        for name in names:
            head = first_of.setdefault(tie_key[name], name)
            if head != name:
                self.aliases[name] = head


class UnionSource(_Combined):
    """Each output name read from the (source, old name) it comes from, bit-exactly."""

    def __init__(self, sources: Sequence[Checkpoint], entries: Sequence[tuple[str, int, str]]):
        self.sources = list(sources)
        self.entries = list(entries)
        self._where = {new: (i, old) for new, i, old in entries}
        self.infos = {new: sources[i].infos[old] for new, i, old in entries}
        # Names tied in the source they come from stay tied; ties never cross sources.
        super().__init__(
            [new for new, _, _ in entries],
            {new: (i, sources[i].canonical(old)) for new, i, old in entries},
        )

    def origin(self) -> dict[str, int]:
        return {new: i for new, i, _ in self.entries}

    def without(self, names: Sequence[str]) -> UnionSource:
        gone = set(names)
        return UnionSource(self.sources, [e for e in self.entries if e[0] not in gone])

    def raw_bytes(self, name: str) -> bytes | memoryview:
        i, old = self._where[name]
        return self.sources[i].raw_bytes(old)

    def tensor(self, name: str) -> torch.Tensor:
        i, old = self._where[name]
        return self.sources[i].tensor(old)

    def write_data(self, name: str, f: BinaryIO) -> int:
        i, old = self._where[name]
        return self.sources[i].write_data(old, f)  # a source may stream through a small buffer


class AverageSource(_Combined):
    """The weighted mean of N sources, computed one tensor at a time and never kept.

    ``renames`` gives each source's (old, new) names; every source must hold the same new
    names with the same shapes and kinds (see :func:`average_problems`).
    """

    def __init__(
        self,
        sources: Sequence[Checkpoint],
        renames: Sequence[Sequence[tuple[str, str]]],
        weights: Sequence[float],
        labels: Sequence[str],
        *,
        names: Sequence[str] | None = None,
    ) -> None:
        if len(weights) != len(sources) or not sources:
            raise MergeError(f"{len(weights)} weights for {len(sources)} sources")
        self.sources = list(sources)
        self.renames = [list(r) for r in renames]
        self.weights = tuple(weights)
        self.labels = list(labels)
        old_of = [{new: old for old, new in r} for r in renames]
        renamed = [
            {new: s.infos[old] for new, old in o.items()}
            for s, o in zip(sources, old_of, strict=True)
        ]
        problems = average_problems(renamed, labels)
        if problems:
            shown = "; ".join(problems[:_SHOWN]) + ("; ..." if len(problems) > _SHOWN else "")
            raise MergeError(
                f"cannot average: the sources need the same keys and shapes, but {shown}; "
                "rename or drop keys per source first (a recipe's [[source]] rules)"
            )
        order = list(names) if names is not None else [new for _, new in renames[0]]
        self._olds = {new: tuple(o[new] for o in old_of) for new in order}
        self.infos = {new: renamed[0][new] for new in order}
        self.notes: list[str] = []
        self.averaged = [n for n in order if _kind(self.infos[n].dtype) in ("floating", "complex")]
        averaged = set(self.averaged)
        self.copied = [n for n in order if n not in averaged]
        mixed: dict[tuple[str, ...], list[str]] = {}
        for new in self.averaged:
            dtypes = tuple(r[new].dtype for r in renamed)
            if len(set(dtypes)) > 1:
                mixed.setdefault(dtypes, []).append(new)
        for dtypes, keys in mixed.items():
            held = ", ".join(f"{lab} {d}" for lab, d in zip(labels, dtypes, strict=True))
            self.notes.append(
                f"{', '.join(group_keys(keys))}: the sources hold different dtypes ({held}); "
                f"averaged in {_acc_name(dtypes)} and stored as {dtypes[0]} (the first source's)"
            )
        self._dtypes = {new: tuple(r[new].dtype for r in renamed) for new in self.averaged}
        self._disagree: list[str] = []
        self._checked: set[str] = set()
        # A name is tied in the output when every source ties it to the same partners.
        ties = {
            new: tuple(s.canonical(o) for s, o in zip(sources, olds, strict=True))
            for new, olds in self._olds.items()
        }
        super().__init__(order, ties)

    def without(self, names: Sequence[str]) -> AverageSource:
        gone = set(names)
        return AverageSource(
            self.sources,
            self.renames,
            self.weights,
            self.labels,
            names=[n for n in self.infos if n not in gone],
        )

    def tensor(self, name: str) -> torch.Tensor:
        if name in self._dtypes:
            return self._mean(name)
        self._check_agreement(name)
        return self.sources[0].tensor(self._olds[name][0])

    def raw_bytes(self, name: str) -> bytes | memoryview:
        if name in self._dtypes:
            return tensor_bytes(self._mean(name))
        self._check_agreement(name)
        return self.sources[0].raw_bytes(self._olds[name][0])

    def _mean(self, name: str) -> torch.Tensor:
        from ckptsurgery.io.dtypes import torch_dtype

        acc_dtype = torch_dtype(_acc_name(self._dtypes[name]))
        acc: torch.Tensor | None = None
        for w, src, old in zip(self.weights, self.sources, self._olds[name], strict=True):
            t = src.tensor(old)
            if acc is None:
                acc = t.to(dtype=acc_dtype) * w  # a new tensor: the source is never written
            else:
                acc.add_(t.to(device=acc.device, dtype=acc_dtype), alpha=w)
            del t  # one source tensor at a time
        assert acc is not None
        return acc.to(torch_dtype(self.infos[name].dtype))

    def _check_agreement(self, name: str) -> None:
        if name in self._checked:
            return
        self._checked.add(name)
        olds = self._olds[name]
        first = memoryview(self.sources[0].raw_bytes(olds[0])).cast("B")
        for src, old in zip(self.sources[1:], olds[1:], strict=True):
            if memoryview(src.raw_bytes(old)).cast("B") != first:
                self._disagree.append(name)
                return

    def disagreement_notes(self) -> list[str]:
        """After the tensors were fetched: the integer tensors the sources disagree on."""
        if not self._disagree:
            return []
        return [
            f"the sources hold different values for {len(self._disagree)} integer or bool "
            f"tensor{'s' if len(self._disagree) != 1 else ''} "
            f"({', '.join(group_keys(self._disagree))}); taken from {self.labels[0]}, the first"
        ]


def _acc_name(dtypes: Sequence[str]) -> str:
    """The dtype to accumulate a mean of ``dtypes`` in: float32 at least, never narrower."""
    wide = any(d in ("float64", "complex128") for d in dtypes)
    if any(d.startswith("complex") for d in dtypes):
        return "complex128" if wide else "complex64"
    return "float64" if wide else "float32"


# --- files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceResult:
    """What one source gave a merge."""

    path: str
    key: str | None  # where its state dict was found inside the file
    other_entries: dict[str, str]
    tensors: int  # tensors in its state dict
    plan: KeyPlan  # its rules' effect
    taken: int  # output tensors that come from it (union) or that it contributes to (average)


@dataclass(frozen=True)
class MergeResult:
    """A merge or average: each source's part, conflicts, the gate's report, what was written."""

    mode: str  # "union" or "average"
    sources: tuple[SourceResult, ...]
    names: tuple[str, ...]  # the output's tensor names, in order
    origin: dict[str, int]  # union: output name -> index of the source it comes from
    conflicts: tuple[Conflict, ...] = ()
    on_conflict: str = "error"
    weights: tuple[float, ...] | None = None  # normalised (average only)
    copied: tuple[str, ...] = ()  # average: integer / bool names taken from the first source
    report: MatchReport | None = None
    notes: tuple[str, ...] = ()
    output: str | None = None
    written: WriteResult | None = None  # None for a dry run

    @property
    def compatible(self) -> bool:
        return self.report is None or self.report.compatible

    def origin_groups(self) -> list[dict[str, Any]]:
        """Where the output's tensors come from, compactly: per source a count and key groups."""
        labels = [s.path for s in self.sources]
        if self.mode == "average":
            copied = set(self.copied)
            averaged = [n for n in self.names if n not in copied]
            out: list[dict[str, Any]] = []
            if averaged:
                out.append(
                    {
                        "source": "all",
                        "how": "weighted mean",
                        "count": len(averaged),
                        "keys": group_keys(averaged),
                    }
                )
            if self.copied:
                out.append(
                    {
                        "source": 0,
                        "name": Path(labels[0]).name,
                        "how": "copied from the first source (integer or bool)",
                        "count": len(self.copied),
                        "keys": group_keys(self.copied),
                    }
                )
            return out
        groups = []
        for i, label in enumerate(labels):
            keys = [n for n in self.names if self.origin.get(n) == i]
            if keys:
                groups.append(
                    {
                        "source": i,
                        "name": Path(label).name,
                        "count": len(keys),
                        "keys": group_keys(keys),
                    }
                )
        return groups

    def to_dict(self) -> dict[str, Any]:
        labels = [s.path for s in self.sources]
        out: dict[str, Any] = {
            "mode": self.mode,
            "output": self.output,
            "written": self.written is not None,
            "sources": [
                {
                    "path": s.path,
                    "key": s.key,
                    "tensors": s.tensors,
                    "kept": len(s.plan.renames),
                    "taken": s.taken,
                    **s.plan.to_dict(),
                }
                for s in self.sources
            ],
            "tensors": len(self.names),
            "origin": self.origin_groups(),
            "notes": list(self.notes),
        }
        if self.mode == "union":
            out["on_conflict"] = self.on_conflict
            out["conflicts"] = [
                {
                    "key": c.key,
                    "sources": [labels[i] for i in c.sources],
                    "taken_from": labels[c.taken_from],
                }
                for c in self.conflicts
            ]
        else:
            out["weights"] = list(self.weights or ())
            out["copied_from_first"] = list(self.copied)
        if self.report is not None:
            out["report"] = self.report.to_json()
        if self.written is not None:
            out.update(format=self.written.format, bytes=self.written.bytes)
        return out


def merge_files(
    sources: Sequence[PathLike | SourceSpec],
    out: PathLike | None,
    *,
    on_conflict: str = "error",
    key: str | None = None,
    format: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    gate: Gate | None = None,
    allow_globals: tuple[str, ...] | list[str] = (),
    unsafe_pickle: bool = False,
    provenance: Mapping[str, Any] | None = None,
    verify: bool = True,
    max_shard_size: int | str | None = None,
) -> MergeResult:
    """Write the union of the checkpoints at ``sources`` to ``out``, tensor by tensor.

    A source is a path (its state dict selected with ``key``) or a :class:`SourceSpec` with its
    own key and rules. ``on_conflict`` is "error" (raise :class:`MergeConflictError`), "first"
    or "last". The output is checked before anything is read; with ``gate`` the result is
    matched against a model first and nothing is written unless it fits
    (:class:`IncompatibleCheckpoint`). A safetensors output records its provenance in
    ``ckptsurgery.*`` metadata (plus the ``provenance`` entries given, JSON-encoded).
    ``verify=False`` skips reading the output back before it takes its name. With
    ``max_shard_size`` (``"5GB"``, ``"2GiB"`` or bytes), ``out`` is a folder (or its
    ``*.safetensors.index.json``) receiving safetensors shards and their index.
    """
    check_on_conflict(on_conflict)
    return _combine(
        _specs(sources, key),
        out,
        weights=None,
        on_conflict=on_conflict,
        format=format,
        force=force,
        dry_run=dry_run,
        gate=gate,
        allow_globals=allow_globals,
        unsafe_pickle=unsafe_pickle,
        provenance=provenance,
        verify=verify,
        max_shard_size=max_shard_size,
    )


def average_files(
    sources: Sequence[PathLike | SourceSpec],
    out: PathLike | None,
    *,
    weights: Sequence[float] | None = None,
    key: str | None = None,
    format: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    gate: Gate | None = None,
    allow_globals: tuple[str, ...] | list[str] = (),
    unsafe_pickle: bool = False,
    provenance: Mapping[str, Any] | None = None,
    verify: bool = True,
    max_shard_size: int | str | None = None,
) -> MergeResult:
    """Write the (weighted) elementwise mean of the checkpoints at ``sources`` to ``out``.

    As :func:`average` for files, computed one tensor at a time (see the module docstring);
    otherwise as :func:`merge_files`.
    """
    specs = _specs(sources, key)
    if len(specs) < 2:
        raise MergeError("averaging needs at least two sources")
    return _combine(
        specs,
        out,
        weights=normalise_weights(weights, len(specs)),
        on_conflict="error",
        format=format,
        force=force,
        dry_run=dry_run,
        gate=gate,
        allow_globals=allow_globals,
        unsafe_pickle=unsafe_pickle,
        provenance=provenance,
        given_weights=tuple(weights or ()),
        verify=verify,
        max_shard_size=max_shard_size,
    )


def _specs(sources: Sequence[PathLike | SourceSpec], key: str | None) -> list[SourceSpec]:
    if isinstance(sources, str | Path):
        raise TypeError("sources must be a list of paths, not one path")
    specs = [s if isinstance(s, SourceSpec) else SourceSpec(s, key=key) for s in sources]
    if not specs:
        raise MergeError("nothing to merge: give at least one source")
    return specs


def _combine(
    specs: list[SourceSpec],
    out: PathLike | None,
    *,
    weights: tuple[float, ...] | None,
    on_conflict: str,
    format: str | None,
    force: bool,
    dry_run: bool,
    gate: Gate | None,
    allow_globals: tuple[str, ...] | list[str],
    unsafe_pickle: bool,
    provenance: Mapping[str, Any] | None,
    given_weights: tuple[float, ...] = (),
    verify: bool = True,
    max_shard_size: int | str | None = None,
) -> MergeResult:
    fmt = None
    shard_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    if out is not None:
        fmt = output_format(out, format, sharded=shard_bytes is not None)
        inputs = [s.path for s in specs]
        if shard_bytes is not None:
            check_output_folder(out, inputs=inputs, force=force or dry_run)
        else:
            check_output_path(out, inputs=inputs, force=force or dry_run)
    elif not dry_run:
        raise OutputError("no output given; pass an output path (only a dry run may omit it)")
    labels = [str(s.path) for s in specs]
    with contextlib.ExitStack() as stack:
        ckpts = [
            stack.enter_context(
                open_checkpoint(
                    s.path, key=s.key, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
                )
            )
            for s in specs
        ]
        plans = [s.rules.plan(c.infos) for s, c in zip(specs, ckpts, strict=True)]
        renames = [p.renames for p in plans]
        merged: UnionSource | AverageSource
        conflicts: list[Conflict] = []
        if weights is None:
            entries, conflicts = plan_union(renames, on_conflict, labels)
            merged = UnionSource(ckpts, entries)
        else:
            merged = AverageSource(ckpts, renames, weights, labels)
        report = None
        if gate is not None:
            report = gate.check(merged)
            if report.dropped_mismatched:
                merged = merged.without([m.key for m in report.dropped_mismatched])
        result = _result(specs, ckpts, plans, merged, conflicts, on_conflict, report, out)
        if dry_run:
            return result
        if gate is not None:
            gate.refuse(report, out)
        if not merged.infos:
            raise MergeError("the rules drop every key; there is nothing to write")
        assert out is not None and fmt is not None  # checked above
        metadata = None
        if fmt == "safetensors":  # a torch output is a flat state dict: no room for metadata
            metadata = _provenance(result, ckpts, specs, gate, given_weights, provenance)
        written = write_checkpoint(
            out,
            merged,
            [(n, n) for n in merged.infos],
            fmt=fmt,
            metadata=metadata,
            overwrite=force,
            verify=verify,
            max_shard_size=shard_bytes,
        )
        notes = result.notes
        if isinstance(merged, AverageSource):
            notes += tuple(merged.disagreement_notes())
    return replace(result, written=written, notes=notes)


def _result(
    specs: Sequence[SourceSpec],
    ckpts: Sequence[Checkpoint],
    plans: Sequence[KeyPlan],
    merged: UnionSource | AverageSource,
    conflicts: Sequence[Conflict],
    on_conflict: str,
    report: MatchReport | None,
    out: PathLike | None,
) -> MergeResult:
    names = tuple(merged.infos)
    if isinstance(merged, UnionSource):
        origin = merged.origin()
        taken = [sum(1 for i in origin.values() if i == j) for j in range(len(specs))]
        return MergeResult(
            mode="union",
            sources=_source_results(specs, ckpts, plans, taken),
            names=names,
            origin=origin,
            conflicts=tuple(conflicts),
            on_conflict=on_conflict,
            report=report,
            output=None if out is None else str(out),
        )
    return MergeResult(
        mode="average",
        sources=_source_results(specs, ckpts, plans, [len(names)] * len(specs)),
        names=names,
        origin={},
        weights=merged.weights,
        copied=tuple(n for n in merged.copied if n in merged.infos),
        report=report,
        notes=tuple(merged.notes),
        output=None if out is None else str(out),
    )


def _source_results(
    specs: Sequence[SourceSpec],
    ckpts: Sequence[Checkpoint],
    plans: Sequence[KeyPlan],
    taken: Sequence[int],
) -> tuple[SourceResult, ...]:
    return tuple(
        SourceResult(str(s.path), c.key, dict(c.other_entries), len(c.infos), p, t)
        for s, c, p, t in zip(specs, ckpts, plans, taken, strict=True)
    )


def _provenance(
    result: MergeResult,
    ckpts: Sequence[Checkpoint],
    specs: Sequence[SourceSpec],
    gate: Gate | None,
    given_weights: tuple[float, ...],
    extra: Mapping[str, Any] | None,
) -> dict[str, str]:
    """The ``ckptsurgery.*`` metadata of a merge: deterministic (no time), so that the same
    inputs give the same bytes."""
    from ckptsurgery.surgery import sha256_file

    sources = []
    for s, c in zip(specs, ckpts, strict=True):
        entry: dict[str, Any] = {"name": c.path.name, "sha256": sha256_file(c.path), "key": c.key}
        if s.rules:
            entry["rules"] = s.rules.to_dict()
        sources.append(entry)
    how: dict[str, Any]
    if result.mode == "union":
        how = {"mode": "union", "on_conflict": result.on_conflict}
        if result.conflicts:
            how["conflicts"] = group_keys(c.key for c in result.conflicts)
    else:
        how = {"mode": "average", "weights": list(result.weights or ())}
        if given_weights:
            how["weights_given"] = list(given_weights)
    meta: dict[str, Any] = {
        "version": __version__,
        "sources": sources,
        "merge": how,
        "origin": result.origin_groups(),
    }
    if gate is not None:
        model = gate.model
        meta["target"] = {
            "model": getattr(model, "spec", type(model).__name__),
            "allow_missing": list(gate.allow_missing),
            "allow_unexpected": list(gate.allow_unexpected),
            "drop_mismatched": gate.drop_mismatched,
        }
    meta.update(extra or {})
    return {
        f"ckptsurgery.{k}": (
            v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), default=repr)
        )
        for k, v in meta.items()
    }
