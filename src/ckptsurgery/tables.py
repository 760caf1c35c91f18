"""Text rendering of reports: the only caller of tabulate."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tabulate import tabulate

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


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str], *, numalign: str = "right") -> str:
    return tabulate(
        list(rows),
        headers=list(headers),
        tablefmt="simple",
        numalign=numalign,
        disable_numparse=True,
    )


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
    return table(rows, ("key", "", "new key"), numalign="left")


def rule_counts_table(plan: KeyPlan) -> str:
    return table(((rule, f"{n:,}") for rule, n in plan.rule_counts), ("rule", "keys"))


def mapping_table(entries: Mapping[str, str], headers: Sequence[str]) -> str:
    return table(entries.items(), headers)
