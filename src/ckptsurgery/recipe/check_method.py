"""Checking a method merge's fields of ``[merge]``: ``method``, ``base``, ``weights``,
``density``, ``lambda``, ``seed``, ``normalize``.

``base`` names one of the ``[[source]]`` blocks by its path (as written, or resolving to the
same file): that source is the base, with its own key and rules; the others are the models,
in order, and ``weights`` has one number per model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ckptsurgery.errors import MergeError
from ckptsurgery.plan.methods import METHODS, method_op
from ckptsurgery.recipe.model import MethodMerge
from ckptsurgery.recipe.problems import Problems, resolve, show

# [merge] fields that only a method merge takes.
METHOD_FIELDS = ("method", "base", "density", "lambda", "seed", "normalize")


def check_method(
    c: Problems, value: Any, sources: Any, base_dir: Path
) -> MethodMerge | bool | None:
    """The method merge of ``[merge]``; False when there is none (no ``method``), None when
    it is malformed (the problems are recorded)."""
    if not isinstance(value, dict):
        return False
    given = [f for f in METHOD_FIELDS if f in value and f != "method"]
    if "method" not in value:
        for f in given:
            c.problem("merge", None, f, 'applies only with method = "..." (a method merge)')
        return False
    bad = len(c.problems)
    method = value["method"]
    if method not in METHODS:
        c.problem(
            "merge",
            None,
            "method",
            f"{show(method)} is not allowed; use one of {', '.join(map(repr, METHODS))}",
        )
    for f in ("average", "on_conflict"):
        if f in value:
            c.problem("merge", None, f, "does not apply with method = ...; remove it")
    base = value.get("base")
    index = None
    if not isinstance(base, str) or not base:
        c.problem(
            "merge",
            None,
            "base",
            f"missing or not a path: name the [[source]] that is the base, e.g. base = "
            f'"base.safetensors"{"" if base is None else ", got " + show(base)}',
        )
    elif isinstance(sources, list):
        index = _base_index(base, sources, base_dir)
        if index is None:
            paths = [s.get("path") for s in sources if isinstance(s, dict)]
            c.problem(
                "merge",
                None,
                "base",
                f"{base!r} is not the path of a [[source]] (they are {paths}); list the base "
                "as a [[source]] and name it here",
            )
    if len(c.problems) > bad or index is None or not isinstance(sources, list):
        return None
    weights = value.get("weights") or None
    seed = value.get("seed")
    normalize = value.get("normalize")
    if normalize is not None and not isinstance(normalize, bool):
        c.problem("merge", None, "normalize", f"must be true or false, got {show(normalize)}")
        return None
    if weights is not None and not isinstance(weights, list):
        c.problem(
            "merge",
            None,
            "weights",
            f"must be a list of numbers, one per model, e.g. [1.0, 0.5], got {show(weights)}",
        )
        return None
    try:
        op = method_op(
            str(method),
            models=len(sources) - 1,
            weights=weights,
            density=value.get("density"),
            lambda_=value.get("lambda", 1.0),
            seed=seed,
            normalize=normalize,
        )
    except MergeError as e:
        c.problem("merge", None, _field_of(str(e)), str(e))
        return None
    return MethodMerge(op=op, base=index)


def _base_index(base: str, sources: Sequence[Any], base_dir: Path) -> int | None:
    target = resolve(base_dir, base)
    for i, s in enumerate(sources):
        if not isinstance(s, Mapping) or not isinstance(s.get("path"), str):
            continue
        path = s["path"]
        if path == base or resolve(base_dir, path) == target:
            return i
        try:
            if resolve(base_dir, path).resolve() == target.resolve():
                return i
        except OSError:
            continue
    return None


def _field_of(message: str) -> str:
    for f in ("weight", "density", "lambda", "seed"):
        if message.startswith(f) or f" {f}" in message.split(";")[0]:
            return "weights" if f == "weight" else f
    return "method"
