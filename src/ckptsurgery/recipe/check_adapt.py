"""Checking a recipe's shape adapters: its ``[[adapt]]`` tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptsurgery.plan.adapt import Adapter, AdapterError, adapter_from_dict
from ckptsurgery.recipe.problems import Problems


def check_adapters(c: Problems, value: Any, base: Path) -> tuple[Adapter, ...] | None:
    """The adapters of ``[[adapt]]`` (``indices_file`` read from ``base``, the recipe's
    folder), or None after reporting each malformed table."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        c.problem(
            "adapt",
            None,
            "",
            "must be written [[adapt]] (double brackets: a list of adapters), each a table with "
            'op = "rows" | "in-chans" | "resample-pos-embed" and key = "..."',
        )
        return None
    out = []
    for i, table in enumerate(value):
        try:
            out.append(adapter_from_dict(table, base=base))
        except AdapterError as e:
            c.problem("adapt", i, e.field, str(e))
    return tuple(out) if len(out) == len(value) else None
