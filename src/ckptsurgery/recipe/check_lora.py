"""Checking a recipe's LoRA adapter: its ``[[lora]]`` table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ckptsurgery.plan.lora import LoraAdapter, LoraError, lora_from_dict
from ckptsurgery.recipe.problems import Problems


def check_lora(c: Problems, value: Any, base: Path) -> tuple[LoraAdapter, ...] | None:
    """The adapter of ``[[lora]]`` (``path`` relative to ``base``, the recipe's folder), or
    None after reporting what is wrong. One adapter is folded per surgery."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        c.problem(
            "lora",
            None,
            "",
            'must be written [[lora]] (double brackets), a table with path = "ADAPTER_DIR"',
        )
        return None
    if len(value) > 1:
        c.problem("lora", 1, "", "one [[lora]] adapter per recipe can be folded")
        return None
    out = []
    for i, table in enumerate(value):
        try:
            adapter = lora_from_dict(table, base=base)
        except LoraError as e:
            c.problem("lora", i, "path" if "path" in str(e) else "", str(e))
            continue
        if not Path(adapter.path).exists():
            c.problem(
                "lora",
                i,
                "path",
                f"{table['path']!r} does not exist (looked for "
                f"{os.path.abspath(adapter.path)!r}; paths are relative to the recipe's folder)",
            )
            continue
        out.append(adapter)
    return tuple(out) if len(out) == len(value) else None
