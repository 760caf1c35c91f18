"""Writing a recipe: the TOML text that :func:`~ckptsurgery.recipe.apply_recipe` runs."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ckptsurgery._types import PathLike
from ckptsurgery.plan.adapt import Adapter
from ckptsurgery.plan.lora import LoraAdapter
from ckptsurgery.recipe.model import RecipeError, Target
from ckptsurgery.rules import Rules


def recipe_toml(
    sources: Sequence[tuple[PathLike, str | None, Rules]],
    target: Target | None,
    output: PathLike,
    *,
    recipe_dir: PathLike | None = None,
    on_conflict: str = "error",
    average: bool = False,
    weights: Sequence[float] = (),
    format: str | None = None,
    max_shard_size: str | int | None = None,
    dtype: str | None = None,
    keep_dtype: Sequence[str] = (),
    adapters: Sequence[Adapter] = (),
    method: Mapping[str, Any] | None = None,
    lora: Sequence[LoraAdapter] = (),
) -> str:
    """A recipe that :func:`apply_recipe` accepts as it is: one ``[[source]]`` per
    ``(path, key, rules)``, one ``[[adapt]]`` per shape adapter, ``[[lora]]`` per LoRA adapter,
    ``[merge]`` when it is not the default, the ``[target]`` gate when given, and ``[output]``
    with the fields given. ``method``: a method merge's ``[merge]`` fields (method, base,
    density, lambda_, seed, normalize); ``base`` is a path, written as the sources' are.

    Paths are written as given; with ``recipe_dir`` (the folder the recipe will be saved in),
    paths relative to the current folder are rewritten relative to it, as ``apply`` reads them.
    The values are written, not checked: :func:`parse_recipe` checks them when it reads them.
    """

    def where(p: PathLike) -> str:
        if recipe_dir is None or Path(p).is_absolute():
            return str(p)
        return os.path.relpath(os.path.abspath(p), os.path.abspath(recipe_dir))

    first = os.path.basename(str(sources[0][0])) if sources else "SRC"
    # TOML allows no control characters in a comment (a newline would end it).
    first = _CONTROL.sub(lambda m: repr(m[0])[1:-1], first)
    chunks = [f"# ckptsurgery apply RECIPE.toml   (made for {first})\n"]
    for path, key, rules in sources:
        source: dict[str, Any] = {"path": where(path)}
        if key:
            source["key"] = key
        source.update(rules.to_dict())
        # Each source on its own: tomli-w would write short ones as one inline array.
        chunks.append("[[source]]\n" + _dumps(source))
    for adapter in adapters:
        chunks.append("[[adapt]]\n" + _dumps(adapter.to_dict()))
    for folded in lora:
        chunks.append("[[lora]]\n" + _dumps({"path": where(folded.path)}))
    tables: dict[str, Any] = {}
    merge: dict[str, Any] = {}
    if on_conflict != "error":
        merge["on_conflict"] = on_conflict
    if average:
        merge["average"] = True
    if method is not None:
        for k, v in method.items():
            merge[k.rstrip("_")] = where(v) if k == "base" else v
    if weights:
        merge["weights"] = list(weights)
    if merge:
        tables["merge"] = merge
    if target is not None:
        tables["target"] = _target_table(target)
    out: dict[str, Any] = {"path": where(output)}
    if format is not None:
        out["format"] = format
    if max_shard_size is not None:
        out["max_shard_size"] = max_shard_size
    if dtype is not None:
        out["dtype"] = dtype
    if keep_dtype:
        out["keep_dtype"] = [keep_dtype] if isinstance(keep_dtype, str) else list(keep_dtype)
    tables["output"] = out
    chunks.append(_dumps(tables))
    return "\n".join(chunks)


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


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
