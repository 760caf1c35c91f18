"""A plan for people: one row per output tensor, and a one-line summary."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptsurgery.render.tables import count, human_bytes, shape_str, table

if TYPE_CHECKING:
    from ckptsurgery.plan.model import Entry, Plan

__all__ = ["plan_summary", "plan_table"]


def plan_table(plan: Plan, *, fmt: str = "simple") -> str:
    """One row per output tensor: where it comes from, the operation, and what it will be."""
    rows = []
    for e in plan.entries:
        src = _from(plan, e)
        arrow = "==" if all(r.key == e.name for r in e.inputs) else "->"
        size = f"tied to {plan.ties[e.name]}" if e.name in plan.ties else human_bytes(e.info.nbytes)
        rows.append(
            (src, arrow, e.name, e.op.describe(), shape_str(e.info.shape), e.info.dtype, size)
        )
    return table(rows, ("key", "", "new key", "op", "shape", "dtype", "bytes"), fmt=fmt)


def _from(plan: Plan, e: Entry) -> str:
    refs = e.inputs
    if len(plan.sources) == 1:
        return refs[0].key
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
