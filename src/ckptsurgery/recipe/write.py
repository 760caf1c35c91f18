"""Writing a recipe: the TOML text that :func:`~ckptsurgery.recipe.apply_recipe` runs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
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
    chunks = [f"# ckptsurgery apply RECIPE.toml   (made for {first})\n"]
    for path, key, rules in sources:
        source: dict[str, Any] = {"path": where(path)}
        if key:
            source["key"] = key
        source.update(rules.to_dict())
        # Each source on its own: tomli-w would write short ones as one inline array.
        chunks.append("[[source]]\n" + _dumps(source))
    tables: dict[str, Any] = {}
    if on_conflict != "error":
        tables["merge"] = {"on_conflict": on_conflict}
    if target is not None:
        tables["target"] = _target_table(target)
    tables["output"] = {"path": where(output)}
    chunks.append(_dumps(tables))
    return "\n".join(chunks)


def _target_table(target: Target) -> dict[str, Any]:
    table: dict[str, Any] = {"model": target.model}
    if target.model_args:
        for k, v in target.model_args.items():
            try:
                _dumps({k: v})
            except RecipeError:
                raise RecipeError(
                    f"model argument {k}={v!r} cannot be written in TOML (no None, no "
                    "objects); leave it out or set it in the recipe by hand"
                ) from None
        table["model_args"] = dict(target.model_args)
    table["allow_missing"] = list(target.allow_missing)
    table["allow_unexpected"] = list(target.allow_unexpected)
    table["drop_mismatched"] = target.drop_mismatched
    return table


def _dumps(table: Mapping[str, Any]) -> str:
    import tomli_w

    try:
        return tomli_w.dumps(table)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"the recipe cannot be written in TOML: {e}") from None
