"""Checking a recipe's inputs: its ``[[source]]`` blocks and ``[merge]``."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptsurgery.errors import RuleError
from ckptsurgery.merge import ON_CONFLICT, SourceSpec
from ckptsurgery.recipe.model import MERGE_FIELDS, SOURCE_FIELDS
from ckptsurgery.recipe.problems import Problems, resolve, show
from ckptsurgery.rules import RULE_FIELDS, Rules


def check_sources(c: Problems, value: Any, base: Path) -> list[SourceSpec] | None:
    if value is None:
        c.problem(
            "source",
            None,
            "",
            'missing: a recipe needs at least one [[source]] with path = "..."',
        )
        return None
    if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
        c.problem(
            "source",
            None,
            "",
            "must be written [[source]] (double brackets: a list of sources), each a table "
            'with path = "..."',
        )
        return None
    out = []
    for i, table in enumerate(value):
        spec = _check_source(c, i, table, base)
        if spec is not None:
            out.append(spec)
    return out if len(out) == len(value) else None


def _check_source(c: Problems, i: int, table: Mapping[str, Any], base: Path) -> SourceSpec | None:
    bad = len(c.problems)
    c.unknown("source", i, table, SOURCE_FIELDS)
    path = table.get("path")
    resolved = None
    if path is None:
        c.problem(
            "source",
            i,
            "",
            'missing field path: the checkpoint to read, e.g. path = "model.pth"',
        )
    elif not isinstance(path, str) or not path:
        c.problem("source", i, "path", f"must be a file name in quotes, got {show(path)}")
    else:
        resolved = resolve(base, path)
        if not resolved.exists():
            c.problem(
                "source",
                i,
                "path",
                f"{path!r} does not exist (looked for {os.path.abspath(resolved)!r}; paths "
                "are relative to the recipe's folder)",
            )
        elif resolved.is_dir():
            c.problem("source", i, "path", f"{path!r} is a directory; name the file")
    key = table.get("key")
    if key is not None and (not isinstance(key, str) or not key):
        c.problem(
            "source",
            i,
            "key",
            f'must be a slash-separated path such as "state_dict", got {show(key)}',
        )
    rules: dict[str, Any] = {}
    for fld in RULE_FIELDS:
        if fld in table:
            value = table[fld]
            message = _rule_type_problem(fld, value)
            if message is None:
                try:
                    Rules.from_dict({fld: value})
                except RuleError as e:
                    message = str(e).removeprefix("rules: ")
            if message is None:
                rules[fld] = value
            else:
                c.problem("source", i, fld, message)
    if len(c.problems) > bad or resolved is None:
        return None
    return SourceSpec(resolved, key=key, rules=Rules.from_dict(rules))


def check_merge(
    c: Problems, value: Any, n_sources: int | None
) -> tuple[str, bool, tuple[float, ...]] | None:
    if value is None:
        return "error", False, ()
    if not isinstance(value, dict):
        c.problem("merge", None, "", "must be a table: [merge] on a line of its own")
        return None
    bad = len(c.problems)
    c.unknown("merge", None, value, MERGE_FIELDS)
    on_conflict = value.get("on_conflict", "error")
    if on_conflict not in ON_CONFLICT:
        c.problem(
            "merge",
            None,
            "on_conflict",
            f"{show(on_conflict)} is not allowed; use one of {', '.join(map(repr, ON_CONFLICT))}",
        )
    average = value.get("average", False)
    if not isinstance(average, bool):
        c.problem("merge", None, "average", f"must be true or false, got {show(average)}")
    elif average and "on_conflict" in value:
        c.problem(
            "merge",
            None,
            "on_conflict",
            "does not apply with average = true (averaging needs the same keys in every "
            "source); remove it",
        )
    weights = value.get("weights", [])
    if "method" in value:  # a method merge's weights: checked with it (check_method)
        weights = []
    if not isinstance(weights, list) or not all(
        isinstance(w, int | float) and not isinstance(w, bool) for w in weights
    ):
        c.problem(
            "merge",
            None,
            "weights",
            f"must be a list of numbers, e.g. [0.5, 0.3, 0.2], got {show(weights)}",
        )
        weights = []
    elif any(not math.isfinite(w) or w <= 0 for w in weights):
        c.problem("merge", None, "weights", f"must all be positive numbers, got {weights}")
    elif weights and average is not True:
        c.problem("merge", None, "weights", "apply only with average = true")
    elif weights and n_sources is not None and len(weights) != n_sources:
        c.problem(
            "merge",
            None,
            "weights",
            f"{len(weights)} weights for {n_sources} [[source]] blocks; give one per source, "
            "in order (or [] for equal weights)",
        )
    if average is True and n_sources is not None and n_sources < 2:
        c.problem("merge", None, "average", "needs at least two [[source]] blocks")
    if len(c.problems) > bad:
        return None
    return str(on_conflict), bool(average), tuple(float(w) for w in weights)


def _rule_type_problem(fld: str, value: Any) -> str | None:
    """The type error of one rule field, phrased for a TOML author, or None."""
    if fld in ("keep", "drop", "strip_prefix"):
        if isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            return None
        example = {"keep": '["encoder.*"]', "drop": '["fc.*"]', "strip_prefix": '["module."]'}[fld]
        return f"must be a list of strings such as {example}, got {show(value)}"
    if fld in ("replace", "regex"):
        ok = isinstance(value, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
            for p in value
        )
        if ok:
            return None
        return (
            f'must be a list of ["old", "new"] string pairs such as [["{"bn" if fld == "replace" else "^blocks"}", '
            f'"{"norm" if fld == "replace" else "layers"}"]], got {show(value)}'
        )
    if fld == "add_prefix" and not isinstance(value, str):
        return f'must be a string such as "model.", got {show(value)}'
    return None
