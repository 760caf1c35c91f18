"""Text rendering of reports: every table the commands print is laid out here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckptsurgery.io.dtypes import TensorInfo
    from ckptsurgery.rules import KeyPlan


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def count(n: int, noun: str) -> str:
    """``count(1, "tensor")`` -> ``"1 tensor"``, ``count(1200, "tensor")`` -> ``"1,200 tensors"``."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str], *, fmt: str = "simple") -> str:
    """Rows under a header and a dashed rule, columns left-aligned and two spaces apart.

    The layout of tabulate's "simple" format with number parsing off (every cell is shown as
    ``str(cell)``, ``None`` as empty, stripped): a column is as wide as its widest cell and at
    least its header plus two, a cell may span lines, and no line ends in spaces. Written
    here because importing tabulate took longer than the rest of ``inspect`` together.
    Rows are meant to be as long as the headers.
    """
    text = [["" if c is None else str(c) for c in row] for row in rows]
    head = [str(h) for h in headers]
    # A short row gets empty cells on the right, short headers on the left (as tabulate).
    ncols = max([len(head), *(len(r) for r in text)])
    head = [""] * (ncols - len(head)) + head
    # As in tabulate, a row of empty cells is an empty line, unless some cell spans lines:
    # then it has no line at all.
    multiline = any("\n" in c for r in [head, *text] for c in r)
    body = [[c.strip() for c in r] + [""] * (ncols - len(r)) for r in text]
    widths = [max([_width(h) + 2, *(_width(r[i]) for r in body)]) for i, h in enumerate(head)]
    lines = _table_lines(head, widths, multiline) or [""]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines += _table_lines(r, widths, multiline)
    return "\n".join(lines)


def _width(cell: str) -> int:
    return max((len(line) for line in cell.splitlines()), default=0)


def _table_lines(cells: Sequence[str], widths: Sequence[int], multiline: bool) -> list[str]:
    """One row of cells (each may hold several lines), padded to the column widths."""
    split = [c.splitlines() if multiline else [c] for c in cells]
    height = max(len(s) for s in split)
    return [
        "  ".join(
            f"{s[i] if i < len(s) else '':<{w}}" for s, w in zip(split, widths, strict=True)
        ).rstrip()
        for i in range(height)
    ]


def tensors_table(infos: Mapping[str, TensorInfo], aliases: Mapping[str, str]) -> str:
    rows = []
    for name, info in infos.items():
        label = f"{name} (tied to {aliases[name]})" if name in aliases else name
        rows.append((label, shape_str(info.shape), info.dtype, f"{info.numel:,}"))
    return table(rows, ("key", "shape", "dtype", "numel"))


def groups_table(groups: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        (g["group"], f"{g['tensors']:,}", f"{g['params']:,}", human_bytes(g["bytes"]))
        for g in groups
    ]
    return table(rows, ("group", "tensors", "params", "bytes"))


def plan_table(plan: KeyPlan) -> str:
    rows = [(old, "->" if old != new else "==", new) for old, new in plan.renames]
    return table(rows, ("key", "", "new key"))


def rule_counts_table(plan: KeyPlan, *, fmt: str = "simple") -> str:
    return table(((rule, f"{n:,}") for rule, n in plan.rule_counts), ("rule", "keys"))


def mapping_table(entries: Mapping[str, str], headers: Sequence[str]) -> str:
    return table(entries.items(), headers)
