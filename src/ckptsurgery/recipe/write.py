"""Writing a recipe: the TOML text that :func:`~ckptsurgery.recipe.apply_recipe` runs."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckptsurgery._types import PathLike
from ckptsurgery.recipe.model import RecipeError, Target
from ckptsurgery.rules import Rules


def recipe_toml(
    sources: Sequence[tuple[PathLike, str | None, Rules]],
    target: Target | None,
    output: PathLike,
    *,
    recipe_dir: PathLike | None = None,
    on_conflict: str = "error",
) -> str:
    """A recipe that :func:`apply_recipe` accepts as it is: one ``[[source]]`` per
    ``(path, key, rules)``, the ``[target]`` gate when given, and ``[output]``.

    Paths are written as given; with ``recipe_dir`` (the folder the recipe will be saved in),
    paths relative to the current folder are rewritten relative to it, as ``apply`` reads them.
    """

    def where(p: PathLike) -> str:
        if recipe_dir is None or Path(p).is_absolute():
            return str(p)
        return os.path.relpath(os.path.abspath(p), os.path.abspath(recipe_dir))

    first = os.path.basename(str(sources[0][0])) if sources else "SRC"
    lines = [f"# ckptsurgery apply RECIPE.toml   (made for {first})", ""]
    for path, key, rules in sources:
        lines.append("[[source]]")
        lines.append(f"path = {_toml_value(where(path))}")
        if key:
            lines.append(f"key = {_toml_value(key)}")
        for name, value in rules.to_dict().items():
            lines.append(f"{name} = {_toml_value(value)}")
        lines.append("")
    if on_conflict != "error":
        lines += ["[merge]", f"on_conflict = {_toml_value(on_conflict)}", ""]
    if target is not None:
        lines.append("[target]")
        lines.append(f"model = {_toml_value(target.model)}")
        if target.model_args:
            for k, v in target.model_args.items():
                if not _tomlable(v):
                    raise RecipeError(
                        f"model argument {k}={v!r} cannot be written in TOML (no None, no "
                        "objects); leave it out or set it in the recipe by hand"
                    )
            lines.append(f"model_args = {_toml_value(dict(target.model_args))}")
        lines.append(f"allow_missing = {_toml_value(list(target.allow_missing))}")
        lines.append(f"allow_unexpected = {_toml_value(list(target.allow_unexpected))}")
        lines.append(f"drop_mismatched = {_toml_value(target.drop_mismatched)}")
        lines.append("")
    lines += ["[output]", f"path = {_toml_value(where(output))}", ""]
    return "\n".join(lines)


def _tomlable(value: Any) -> bool:
    if isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return True
    if isinstance(value, list | tuple):
        return all(_tomlable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _tomlable(v) for k, v in value.items())
    return False


def _toml_value(value: Any) -> str:
    """``value`` as a TOML value (inline tables and arrays); see :func:`_tomlable`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
