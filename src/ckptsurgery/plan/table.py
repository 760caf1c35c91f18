"""A plan for people: a row per output tensor (or per group of them), and one-line summaries.

Grouped (``plan_table(plan, group=True)``, what ``--dry-run`` prints), tensors renamed the
same way with the same operation, shape and dtype share a row whose keys are written as
``diff`` writes them: ``module.layer.{0..5}.weight -> layer.{0..5}.weight``. The rename is
what differs between a key and its new name once their common leading and trailing dotted
parts are set aside; those common parts are grouped (:func:`~ckptsurgery.keygroups.group_keys`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptsurgery.keygroups import expand_group, group_keys
from ckptsurgery.render.tables import count, human_bytes, shape_str, table

if TYPE_CHECKING:
    from ckptsurgery.plan.model import Entry, Plan

__all__ = ["plan_summary", "plan_table"]

_HEADERS = ("key", "", "new key", "op", "shape", "dtype", "bytes")
# Stands for the renamed middle of a key while the keys around it are grouped; one dotted part
# that no real key holds (group_keys keeps it as it is: no digits, no braces).
_MIDDLE = "@renamed@"


def plan_table(plan: Plan, *, fmt: str = "simple", group: bool = False) -> str:
    """One row per output tensor: where it comes from, the operation, and what it will be.

    ``group=True`` writes tensors renamed alike (same operation, shape and dtype, from the same
    sources) as one row of grouped keys, with their bytes added up.
    """
    if group:
        return table(_grouped_rows(plan), _HEADERS, fmt=fmt)
    rows = []
    for e in plan.entries:
        src = _from(plan, e)
        arrow = "==" if all(r.key == e.name for r in e.inputs) else "->"
        size = f"tied to {plan.ties[e.name]}" if e.name in plan.ties else human_bytes(e.info.nbytes)
        rows.append(
            (src, arrow, e.name, e.op.describe(), shape_str(e.info.shape), e.info.dtype, size)
        )
    return table(rows, _HEADERS, fmt=fmt)


# (sources, old middle, new middle, op, shape, dtype, tied to): tensors renamed and made alike
_Class = tuple[str, str, str, str, tuple[int, ...], str, str | None]


def _grouped_rows(plan: Plan) -> list[tuple[str, ...]]:
    classes: dict[_Class, list[str]] = {}  # -> the keys with their middle replaced
    nbytes: dict[_Class, int] = {}
    for e in plan.entries:
        old, new = e.inputs[0].key, e.name
        sources = _sources(plan, e)
        before, after, template = _split_rename(old, new)
        if template is None or sources is None:  # a key that cannot be grouped: its own row
            before, after, template = old, new, _MIDDLE
            sources = "" if len(plan.sources) == 1 else _from(plan, e) + "\0"
        sig: _Class = (
            sources,
            before,
            after,
            e.op.describe(),
            tuple(e.info.shape),
            e.info.dtype,
            plan.ties.get(e.name),
        )
        classes.setdefault(sig, []).append(template)
        nbytes[sig] = nbytes.get(sig, 0) + e.info.nbytes
    rows: list[tuple[str, ...]] = []
    for sig, templates in classes.items():
        sources, before, after, op, shape, dtype, tied = sig
        each = nbytes[sig] // len(templates)  # a class's tensors are alike: one size
        for pattern in group_keys(templates):
            old, new = _fill(pattern, before), _fill(pattern, after)
            arrow = "==" if old == new else "->"
            if sources.endswith("\0"):  # a row of its own, shown as the ungrouped table does
                old = sources[:-1]
            elif sources:
                old = f"{sources} {old}"
            n = len(expand_group(pattern))
            size = f"tied to {tied}" if tied is not None else human_bytes(each * n)
            rows.append((old, arrow, new, op, shape_str(shape), dtype, size))
    return rows


def _sources(plan: Plan, e: Entry) -> str | None:
    """The sources an entry's first input key is read from, as the table prefixes its key
    (``#2``, ``#1..#3``; nothing with one source); None when its inputs have other keys."""
    refs = e.inputs
    if len(plan.sources) == 1:
        return ""
    if e.op.name == "lora-fold" or len(refs) == 1:  # a fold's op names the adapter's pair
        return f"#{refs[0].source + 1}"
    if len({r.key for r in refs}) == 1:
        return f"#{refs[0].source + 1}..#{refs[-1].source + 1}"
    return None


def _split_rename(old: str, new: str) -> tuple[str, str, str | None]:
    """``module.layer.0.w``, ``layer.0.w`` -> (``module``, ``""``, ``@renamed@.layer.0.w``):
    what differs, and the key with it replaced by one placeholder part (None: ungroupable)."""
    a, b = old.split("."), new.split(".")
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    if "" in a or "" in b or _MIDDLE in a:
        return old, new, None
    middle_a, middle_b = a[head : len(a) - tail], b[head : len(b) - tail]
    if not middle_a and not middle_b:  # unchanged
        return "", "", old
    parts = [*a[:head], _MIDDLE, *a[len(a) - tail :]]
    return ".".join(middle_a), ".".join(middle_b), ".".join(parts)


def _fill(pattern: str, middle: str) -> str:
    if _MIDDLE not in pattern:
        return pattern
    if middle:
        return pattern.replace(_MIDDLE, middle)
    for text in (f"{_MIDDLE}.", f".{_MIDDLE}", _MIDDLE):
        if text in pattern:
            return pattern.replace(text, "", 1)
    return pattern


def _from(plan: Plan, e: Entry) -> str:
    refs = e.inputs
    if len(plan.sources) == 1:
        return refs[0].key
    if e.op.name == "lora-fold":  # its op names the adapter's pair
        return plan.label(refs[0])
    if len(refs) > 1 and len({r.key for r in refs}) == 1:
        return f"#{refs[0].source + 1}..#{refs[-1].source + 1} {refs[0].key}"
    return ", ".join(plan.label(r) for r in refs)


def plan_summary(plan: Plan, *, verb: str = "write") -> str:
    """``7 tensors, 9.2 MiB to write; 5 cast to bfloat16 (4.6 MiB saved)``."""
    text = f"{count(len(plan.entries), 'tensor')}, {human_bytes(plan.total_bytes)} to {verb}"
    cast = plan.cast
    if cast:
        saved = plan.bytes_saved
        what = "saved" if saved >= 0 else "added"
        text += (
            f"; {count(len(cast), 'tensor')} cast to {plan.dtype} "
            f"({human_bytes(abs(saved))} {what})"
        )
    return text
