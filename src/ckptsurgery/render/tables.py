"""Every table the commands print, laid out by tabulate in the format of ``--fmt``."""

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


# The tabulate formats that --fmt offers: text tables for a terminal, Markdown, reST or org.
# A test keeps them in tabulate's own list (tabulate.tabulate_formats), which is not read here
# because the commands' options are built without importing tabulate.
TABLE_FORMATS: tuple[str, ...] = (
    "simple",
    "plain",
    "github",
    "pipe",
    "grid",
    "simple_grid",
    "rounded_grid",
    "fancy_grid",
    "psql",
    "rst",
    "orgtbl",
)


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str], *, fmt: str = "simple") -> str:
    """``rows`` under ``headers`` in the tabulate format ``fmt`` (one of :data:`TABLE_FORMATS`).

    Number parsing is off: every cell is shown as ``str(cell)`` and aligned left, so "1,234" and
    "007" stay as written; ``None`` is an empty cell and cells are stripped. In the "simple"
    format a column is as wide as its widest cell and at least its header plus two, columns are
    two spaces apart under a dashed rule, a cell may span lines and no line ends in spaces.
    Every row has one cell per header. tabulate is imported here, when the first table is laid
    out, not when a command starts.
    """
    from tabulate import tabulate

    if fmt not in TABLE_FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; use one of {', '.join(TABLE_FORMATS)}")
    return str(
        tabulate(
            [list(row) for row in rows],
            headers=list(headers),
            tablefmt=fmt,
            disable_numparse=True,
            missingval="",
        )
    )


def tensors_table(
    infos: Mapping[str, TensorInfo], aliases: Mapping[str, str], *, fmt: str = "simple"
) -> str:
    rows = []
    for name, info in infos.items():
        label = f"{name} (tied to {aliases[name]})" if name in aliases else name
        rows.append((label, shape_str(info.shape), info.dtype, f"{info.numel:,}"))
    return table(rows, ("key", "shape", "dtype", "numel"), fmt=fmt)


def groups_table(groups: Sequence[Mapping[str, Any]], *, fmt: str = "simple") -> str:
    rows = [
        (g["group"], f"{g['tensors']:,}", f"{g['params']:,}", human_bytes(g["bytes"]))
        for g in groups
    ]
    return table(rows, ("group", "tensors", "params", "bytes"), fmt=fmt)


def rule_counts_table(plan: KeyPlan, *, fmt: str = "simple") -> str:
    return table(((rule, f"{n:,}") for rule, n in plan.rule_counts), ("rule", "keys"), fmt=fmt)


def mapping_table(
    entries: Mapping[str, str], headers: Sequence[str], *, fmt: str = "simple"
) -> str:
    return table(entries.items(), headers, fmt=fmt)
