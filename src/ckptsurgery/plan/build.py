"""Building a :class:`~ckptsurgery.plan.model.Plan` from opened sources' headers alone.

Every surgery is built here, the same way: each source's rules rename its keys
(:meth:`Rules.plan`), the sources are combined (``remap``: one source; ``union``: the keys of
all, a key in several being a conflict; ``average``: the weighted mean of every floating
tensor), then ``dtype`` turns copies of floating tensors into casts. No tensor byte is read.

Decisions:

- Union order: the first source's keys, then each later source's new keys. A key in several
  sources is an error by default, or taken from the first / last source that has it (its
  position stays that of its first appearance).
- Averaging needs the same keys, shapes and kinds (floating, complex, integer, bool) in every
  source. Integer and bool tensors are copied from the first source and compared with the
  others' while writing.
- A cast touches real floating tensors only (see :mod:`ckptsurgery.plan.ops`), and none whose
  output key matches a ``keep_dtype`` glob (fnmatch on the whole key, ``*`` matches dots).
- Outputs made by the same operation from the same stored tensors stay tied (stored once).
- Shape adapters (:mod:`ckptsurgery.plan.adapt`) apply to the output names, after the rules
  and the merge, before the cast; not to an average (average first, then adapt the result).
- A method merge (mode ``method``: task arithmetic, TIES, DARE; the base is source 0) needs
  what an average needs: the same keys, shapes and kinds everywhere. Floating tensors are
  merged by the method's op; integer and bool tensors are copied from the base and compared
  with the others'; complex tensors are refused (a sign election means nothing for them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from ckptsurgery.errors import MergeConflictError, MergeError
from ckptsurgery.io import Checkpoint, TensorInfo
from ckptsurgery.keygroups import group_keys
from ckptsurgery.plan.adapt import Adapter, bind_adapters
from ckptsurgery.plan.adapters import ADAPTER_OPS
from ckptsurgery.plan.model import (
    COPY,
    METHOD_OPS,
    MODES,
    Conflict,
    Entry,
    Op,
    Plan,
    Ref,
    SourcePart,
)
from ckptsurgery.plan.ops import accumulator, cast_op, castable, check_dtype, mean_op, output_info
from ckptsurgery.rules import Rules

if TYPE_CHECKING:
    from ckptsurgery.plan.lora import OpenedLora

__all__ = ["ON_CONFLICT", "average_problems", "build_plan", "check_on_conflict", "plan_union"]

ON_CONFLICT = ("error", "first", "last")
_SHOWN = 5  # key groups named in an error message before "..."


def build_plan(
    ckpts: Sequence[Checkpoint],
    rules: Sequence[Rules],
    *,
    mode: str,
    labels: Sequence[str] | None = None,
    on_conflict: str = "error",
    weights: Sequence[float] | None = None,
    dtype: str | None = None,
    keep_dtype: Sequence[str] = (),
    adapters: Sequence[Adapter] = (),
    method: Op | None = None,
    lora: OpenedLora | None = None,
) -> Plan:
    """The plan of a surgery on the opened sources ``ckpts``, each renamed by its ``rules``.

    ``mode``: "remap" (one source), "union" or "average" (``weights`` normalised, one per
    source) or "method" (``method``: a checked op of :func:`ckptsurgery.plan.methods.method_op`,
    the base being the first source). ``adapters`` change the shape of the output tensors they
    match (after renaming). ``lora``: an opened LoRA adapter folded into the output tensors it
    names (after renaming), the plan's last source (:mod:`ckptsurgery.plan.lora`). ``labels``
    name the sources in messages (default: their paths). Raises
    :class:`MergeConflictError` for keys in several sources under ``on_conflict="error"``,
    :class:`MergeError` for sources that cannot be averaged.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    check_on_conflict(on_conflict)
    check_dtype(dtype)
    labels = list(labels) if labels is not None else [str(c.path) for c in ckpts]
    keyplans = [r.plan(c.infos) for r, c in zip(rules, ckpts, strict=True)]
    renames = [p.renames for p in keyplans]
    conflicts: list[Conflict] = []
    notes: list[str] = []
    if mode == "average":
        if weights is None or len(weights) != len(ckpts):
            raise MergeError(f"{len(weights or ())} weights for {len(ckpts)} sources")
        raw = _average_entries(ckpts, renames, tuple(weights), labels, notes)
    elif mode == "method":
        if method is None or method.name not in METHOD_OPS:
            raise MergeError(f"mode 'method' needs a merge method ({', '.join(METHOD_OPS)})")
        raw = _method_entries(ckpts, renames, method, labels, notes)
    else:
        triples, conflicts = plan_union(renames, on_conflict, labels)
        raw = [(new, COPY, (Ref(i, old),), ()) for new, i, old in triples]

    infos = [c.infos for c in ckpts]
    if adapters:
        if mode in ("average", "method"):
            raise MergeError(
                "shape adapters apply to a remap or a union, not to an average or a method "
                "merge; merge first, then adapt the result with remap"
            )
        bound, unused = bind_adapters(
            adapters, {name: infos[r[0].source][r[0].key] for name, _, r, _ in raw}
        )
        raw = [(name, bound.get(name, op), refs, cmp) for name, op, refs, cmp in raw]
        notes += unused
    opened = list(ckpts)
    if lora is not None:
        if mode in ("average", "method"):
            raise MergeError(
                "a LoRA adapter folds into a remap or a union, not an average or a method "
                "merge; fold the adapter into its base first, then merge the result"
            )
        infos.append(lora.ckpt.infos)
        opened.append(lora.ckpt)
        raw = lora.bind(
            raw,
            lambda r: infos[r.source][r.key],
            len(ckpts),
            lambda r: (r.source, opened[r.source].canonical(r.key)),
        )
    entries: list[Entry] = []
    used_keep: set[str] = set()
    for name, op, inputs, compare in raw:
        input_infos = tuple(infos[r.source][r.key] for r in inputs)
        if dtype is not None:
            op = _with_dtype(op, name, input_infos, dtype, keep_dtype, used_keep)
        entries.append(Entry(name, output_info(op, input_infos), op, inputs, input_infos, compare))
    if dtype is not None:
        notes += [f"--keep-dtype {g} matched no key" for g in keep_dtype if g not in used_keep]

    parts = tuple(
        SourcePart(
            path=label,
            key=c.key,
            format=c.format,
            tensors=len(c.infos),
            bytes=c.total_bytes,
            rules=r,
            keys=p,
            other_entries=dict(c.other_entries),
            taken=sum(1 for e in entries if any(ref.source == j for ref in e.inputs)),
        )
        for j, (label, c, r, p) in enumerate(zip(labels, ckpts, rules, keyplans, strict=True))
    )
    if lora is not None:
        n = len(ckpts)
        parts += (
            lora.source_part(sum(1 for e in entries if any(r.source == n for r in e.inputs))),
        )
    return Plan(
        mode=mode,
        sources=parts,
        entries=tuple(entries),
        ties=_ties(entries, opened),
        on_conflict=on_conflict,
        conflicts=tuple(conflicts),
        weights=tuple(weights) if mode == "average" and weights is not None else None,
        dtype=dtype,
        keep_dtype=tuple(keep_dtype),
        notes=tuple(notes),
        method=method if mode == "method" else None,
    )


_Raw = tuple[str, Op, tuple[Ref, ...], tuple[Ref, ...]]  # name, op, inputs, compare


def _with_dtype(
    op: Op,
    name: str,
    inputs: Sequence[TensorInfo],
    dtype: str,
    keep: Sequence[str],
    used_keep: set[str],
) -> Op:
    """``op`` storing its result as ``dtype``, when ``name`` is to be cast."""
    source = inputs[0].dtype
    if not castable(source) or not all(castable(i.dtype) for i in inputs):
        return op
    kept = [g for g in keep if fnmatchcase(name, g)]
    if kept:
        used_keep.update(kept)
        return op
    if source == dtype:
        return op
    if op.is_copy:
        return cast_op(dtype)
    if op.name in ("mean", "weighted-sum"):
        return mean_op(op.param("weights"), dtype)
    if op.name in ADAPTER_OPS or op.name in METHOD_OPS or op.name == "lora-fold":
        return Op(op.name, (*op.params, ("dtype", dtype)))
    return op


def _ties(entries: Sequence[Entry], ckpts: Sequence[Checkpoint]) -> dict[str, str]:
    """Output name -> the output name storing the same data: made by the same operation from
    the same stored tensors."""
    first: dict[object, str] = {}
    ties: dict[str, str] = {}
    for e in entries:
        if any(info.numel == 0 for info in e.input_infos):
            continue  # empty tensors share nothing worth tying
        ident = (e.op, tuple((r.source, ckpts[r.source].canonical(r.key)) for r in e.inputs))
        head = first.setdefault(ident, e.name)
        if head != e.name:
            ties[e.name] = head
    return ties


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
            where = " and ".join(labels[i] for i in srcs)
            shown.append(f"in {where}: {_groups(keys)}")
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


def kind(dtype: str) -> str:
    """floating, complex, integer or bool: what may be averaged with what."""
    if dtype == "bool":
        return "bool"
    if dtype.startswith("complex"):
        return "complex"
    if dtype.startswith(("float", "bfloat")):
        return "floating"
    return "integer"


def _average_entries(
    ckpts: Sequence[Checkpoint],
    renames: Sequence[Sequence[tuple[str, str]]],
    weights: tuple[float, ...],
    labels: Sequence[str],
    notes: list[str],
) -> list[_Raw]:
    """An average's entries: the weighted mean of every floating or complex tensor, a copy
    of the first source's for the others (compared with the other sources')."""
    return _combined_entries(
        ckpts,
        renames,
        mean_op(weights),
        labels,
        notes,
        kinds=("floating", "complex"),
        failure="cannot average: the sources need the same keys and shapes",
        stored="averaged in {acc} and stored as {dtype} (the first source's)",
    )


def _method_entries(
    ckpts: Sequence[Checkpoint],
    renames: Sequence[Sequence[tuple[str, str]]],
    method: Op,
    labels: Sequence[str],
    notes: list[str],
) -> list[_Raw]:
    """A method merge's entries: the method's op over (base, models...) for every floating
    tensor, a copy of the base's for the others (compared with the models')."""
    return _combined_entries(
        ckpts,
        renames,
        method,
        labels,
        notes,
        kinds=("floating",),
        failure=(
            f"cannot merge by {method.name}: the base and the models need the same keys and shapes"
        ),
        stored="merged in {acc} and stored as {dtype} (the base's)",
        refused=("complex", f"complex tensors cannot be merged by {method.name}"),
    )


def _combined_entries(
    ckpts: Sequence[Checkpoint],
    renames: Sequence[Sequence[tuple[str, str]]],
    op: Op,
    labels: Sequence[str],
    notes: list[str],
    *,
    kinds: Sequence[str],
    failure: str,
    stored: str,
    refused: tuple[str, str] | None = None,
) -> list[_Raw]:
    """Entries made from every source's tensor of one name: ``op`` over them for the
    tensors of ``kinds``, a copy of the first source's for the others. The sources need the
    same keys and shapes (else :class:`MergeError` starting with ``failure``); tensors of the
    kind ``refused[0]`` are refused with ``refused[1]``; a note (``stored``) names the
    tensors whose sources hold different dtypes."""
    old_of = [{new: old for old, new in r} for r in renames]
    renamed = [
        {new: c.infos[old] for new, old in o.items()} for c, o in zip(ckpts, old_of, strict=True)
    ]
    problems = average_problems(renamed, labels)
    if refused is not None:
        bad = [k for k in renamed[0] if kind(renamed[0][k].dtype) == refused[0]]
        if bad:
            problems.append(f"{refused[1]} ({_groups(bad)})")
    if problems:
        shown = "; ".join(problems[:_SHOWN]) + ("; ..." if len(problems) > _SHOWN else "")
        raise MergeError(
            f"{failure}, but {shown}; rename or drop keys per source first (a recipe's "
            "[[source]] rules)"
        )
    raw: list[_Raw] = []
    mixed: dict[tuple[str, ...], list[str]] = {}
    for _, new in renames[0]:
        refs = tuple(Ref(j, o[new]) for j, o in enumerate(old_of))
        dtypes = tuple(r[new].dtype for r in renamed)
        if kind(dtypes[0]) in kinds:
            raw.append((new, op, refs, ()))
            if len(set(dtypes)) > 1:
                mixed.setdefault(dtypes, []).append(new)
        else:
            raw.append((new, COPY, refs[:1], refs[1:]))
    for dtypes, keys in mixed.items():
        held = ", ".join(f"{lab} {d}" for lab, d in zip(labels, dtypes, strict=True))
        how = stored.format(acc=accumulator(dtypes), dtype=dtypes[0])
        notes.append(
            f"{', '.join(group_keys(keys))}: the sources hold different dtypes ({held}); {how}"
        )
    return raw


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
        problems.append(f"{len(keys)} key{'s' if len(keys) != 1 else ''} {where} ({_groups(keys)})")
    for key in (k for k in infos[0] if k in everywhere) if infos else ():
        shapes = [i[key].shape for i in infos]
        kinds = [kind(i[key].dtype) for i in infos]
        if len(set(shapes)) > 1:
            detail = ", ".join(f"{labels[j]} {list(s)}" for j, s in enumerate(shapes))
            problems.append(f"{key} has different shapes ({detail})")
        elif len(set(kinds)) > 1:
            detail = ", ".join(f"{labels[j]} {i[key].dtype}" for j, i in enumerate(infos))
            problems.append(f"{key} cannot be averaged across dtypes ({detail})")
    return problems


def _groups(keys: Sequence[str]) -> str:
    groups = group_keys(keys)
    return ", ".join(groups[:_SHOWN]) + (", ..." if len(groups) > _SHOWN else "")
