"""The problems found in a recipe, each located by table, field and line, and the helpers
that phrase them."""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ckptsurgery.recipe.model import RecipeError


class Problems:
    """Collects every problem of a recipe, each located by table, field and line."""

    def __init__(self, name: str, lines: dict[tuple[str, int | None, str], int]) -> None:
        self.name = name
        self.lines = lines
        self.problems: list[str] = []
        self._lines: list[float] = []  # each problem's line, to report them in file order

    def problem(self, table: str, index: int | None, fld: str, message: str) -> None:
        line = self.lines.get((table, index, fld)) or self.lines.get((table, index, ""))
        self.located(line, f"{label(table, index)}{' ' + fld if fld else ''}: {message}")

    def located(self, line: int | None, message: str) -> None:
        self.problems.append(f"line {line}: {message}" if line else message)
        self._lines.append(line if line else math.inf)

    def raise_if_any(self) -> None:
        if not self.problems:
            return
        order = sorted(range(len(self.problems)), key=lambda i: self._lines[i])
        self.problems = [self.problems[i] for i in order]
        if len(self.problems) == 1:
            raise RecipeError(f"{self.name}: {self.problems[0]}", problems=self.problems)
        raise RecipeError(
            f"{self.name}: {len(self.problems)} problems: " + "; ".join(self.problems),
            problems=self.problems,
        )

    def unknown(
        self, table: str, index: int | None, data: Mapping[str, Any], allowed: Sequence[str]
    ) -> None:
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.problem(
                    table, index, key, f"unknown field{hint}; allowed: {', '.join(allowed)}"
                )


def label(table: str, index: int | None) -> str:
    if table in ("source", "adapt"):
        return f"[[{table}]]" if index is None else f"[[{table}]] #{index + 1}"
    return f"[{table}]"


def resolve(base: Path, path: str) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else base / p


def show(value: Any) -> str:
    """What a wrong value is, and the value on one line: ``an array ([1])``.

    The value is spelled as JSON, which TOML's strings, numbers, booleans and arrays share.
    """
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):  # a date or time
        text = str(value)
    return f"{kind} ({text})"
