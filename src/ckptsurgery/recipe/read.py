"""Reading a recipe: TOML text to a checked :class:`~ckptsurgery.recipe.Recipe`."""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ckptsurgery._types import PathLike
from ckptsurgery.recipe.check_adapt import check_adapters
from ckptsurgery.recipe.check_in import check_merge, check_sources
from ckptsurgery.recipe.check_lora import check_lora
from ckptsurgery.recipe.check_method import check_method
from ckptsurgery.recipe.check_out import check_output, check_target
from ckptsurgery.recipe.model import TABLES, MethodMerge, Recipe, RecipeError
from ckptsurgery.recipe.problems import Problems


def load_recipe(path: PathLike) -> Recipe:
    """Read and check the recipe at ``path`` (raises :class:`RecipeError` naming every fault)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"recipe {str(p)!r} does not exist") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe {str(p)!r} is a directory; give the .toml file") from None
    except OSError as e:
        raise RecipeError(f"recipe {str(p)!r} cannot be read: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {str(p)!r} is not UTF-8 text") from None
    recipe = parse_recipe(text, base=p.parent, name=str(p))
    return replace(recipe, path=p, sha256=hashlib.sha256(data).hexdigest())


def parse_recipe(text: str, *, base: PathLike = ".", name: str = "recipe") -> Recipe:
    """A recipe from TOML ``text``; relative paths are taken from ``base``."""
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{name} is not valid TOML: {e}") from None
    checker = _Checker(name, _field_lines(text))
    recipe = checker.recipe(data, Path(base))
    checker.raise_if_any()
    assert recipe is not None
    return recipe


class _Checker(Problems):
    """Checks a recipe's tables, each by its own function, collecting every problem."""

    def recipe(self, data: Mapping[str, Any], base: Path) -> Recipe | None:
        for key, value in data.items():
            if key not in TABLES:
                close = difflib.get_close_matches(key, TABLES, n=1)
                hint = f" (did you mean [{close[0]}]?)" if close else ""
                what = (
                    f"[{key}]: unknown table"
                    if isinstance(value, dict | list)
                    else (f"{key}: unknown top-level field")
                )
                self.located(
                    self.lines.get((key, None, "")),
                    f"{what}{hint}; allowed: [[source]], [merge], [target], [output], [[adapt]], "
                    "[[lora]]",
                )
        raw_sources = data.get("source")
        sources = check_sources(self, raw_sources, base)
        n_sources = len(raw_sources) if isinstance(raw_sources, list) else None
        adapters = check_adapters(self, data.get("adapt"), base)
        lora = check_lora(self, data.get("lora"), base)
        merge = check_merge(self, data.get("merge"), n_sources)
        method = check_method(self, data.get("merge"), raw_sources, base)
        target = check_target(self, data.get("target"))
        out = check_output(self, data.get("output"), base)
        if self.problems or sources is None or out is None or merge is None or adapters is None:
            return None
        if method is None or lora is None:
            return None
        on_conflict, average, weights = merge
        return Recipe(
            path=Path(self.name),
            sources=tuple(sources),
            output=out.output,
            format=out.format,
            on_conflict=on_conflict,
            average=average,
            weights=weights,
            target=target,
            max_shard_size=out.max_shard_size,
            dtype=out.dtype,
            keep_dtype=out.keep_dtype,
            adapters=adapters,
            method=method if isinstance(method, MethodMerge) else None,
            lora=lora,
        )


# A key is bare, "basic" (with escapes) or 'literal'; a header holds a dotted path of keys and
# nothing after it but a comment, so an array's element on its own line (["bn", "norm"],) is
# not taken for one.
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_KEY_PATH = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_ARRAY_HEADER = re.compile(rf"^\[\[\s*({_KEY_PATH})\s*\]\]\s*(?:#.*)?$")
_TABLE_HEADER = re.compile(rf"^\[\s*({_KEY_PATH})\s*\]\s*(?:#.*)?$")
_KEY = re.compile(rf"^({_KEY_PART})\s*=")


def _key_path(text: str) -> list[str]:
    """The keys of a dotted header, unquoted (escapes left as written: a lookup key only)."""
    return [k[1:-1] if k[0] in "\"'" else k for k in re.findall(_KEY_PART, text)]


def _field_lines(text: str) -> dict[tuple[str, int | None, str], int]:
    """(table, array index, field) -> the line it is on; "" for the table header itself.

    tomllib gives no positions for values, so the lines are found by reading the text: good
    for the plain layout recipes use; a field it cannot place is reported without a line.
    A sub-table's header (``[target.model_args]``) is the line of that field of its table.
    """
    lines: dict[tuple[str, int | None, str], int] = {}
    counts: dict[str, int] = {}
    table, index = "", None
    for number, raw in enumerate(text.split("\n"), 1):
        s = raw.strip()
        if m := _ARRAY_HEADER.match(s):
            table = ".".join(_key_path(m[1]))
            counts[table] = counts.get(table, -1) + 1
            index = counts[table]
            lines.setdefault((table, index, ""), number)
            lines.setdefault((table, None, ""), number)
        elif m := _TABLE_HEADER.match(s):
            path = _key_path(m[1])
            table, index = ".".join(path), None
            lines.setdefault((table, None, ""), number)
            if len(path) > 1:
                lines.setdefault((path[0], None, path[1]), number)
        elif m := _KEY.match(s):
            key = _key_path(m[1])[0]
            if table:
                lines.setdefault((table, index, key), number)
            else:  # a top-level key: it is its own "table" in messages
                lines.setdefault((key, None, ""), number)
    return lines
