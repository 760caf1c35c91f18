"""Running a recipe: read every source through its rules, merge or average, gate, write."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckptsurgery._types import PathLike
from ckptsurgery.merge import SourceSpec, average_files, merge_files
from ckptsurgery.recipe.model import RecipeResult, Target
from ckptsurgery.recipe.read import load_recipe

if TYPE_CHECKING:
    from ckptsurgery.surgery import Gate


def apply_recipe(
    path: PathLike,
    *,
    dry_run: bool = False,
    force: bool = False,
    key: str | None = None,
    allow_globals: tuple[str, ...] | list[str] = (),
    unsafe_pickle: bool = False,
    verify: bool = True,
    max_shard_size: int | str | None = None,
) -> RecipeResult:
    """Run the recipe at ``path``: read every source through its rules, merge (or average),
    gate against the target, and write the output with its provenance.

    ``key`` is the state dict path for sources whose ``[[source]]`` gives none. A dry run
    plans everything (the gate included) and writes nothing. Applying a recipe twice to the
    same inputs writes byte-identical files (the provenance holds no time).
    ``max_shard_size`` overrides the recipe's ``[output] max_shard_size``.
    """
    recipe = load_recipe(path)
    sources = [s if s.key is not None else SourceSpec(s.path, key, s.rules) for s in recipe.sources]
    gate, note = _gate(recipe.target)
    provenance: dict[str, Any] = {"recipe": {"name": recipe.path.name, "sha256": recipe.sha256}}
    if recipe.target is not None:
        provenance["target"] = recipe.target.to_dict()  # with its model_args
    common: dict[str, Any] = {
        "format": recipe.format,
        "force": force,
        "dry_run": dry_run,
        "gate": gate,
        "allow_globals": allow_globals,
        "unsafe_pickle": unsafe_pickle,
        "provenance": provenance,
        "verify": verify,
        "max_shard_size": recipe.max_shard_size if max_shard_size is None else max_shard_size,
    }
    if recipe.average:
        result = average_files(sources, recipe.output, weights=recipe.weights or None, **common)
    else:
        result = merge_files(sources, recipe.output, on_conflict=recipe.on_conflict, **common)
    return RecipeResult(recipe, result, note)


def _gate(target: Target | None) -> tuple[Gate | None, str | None]:
    if target is None:
        return None, None
    from ckptsurgery.models import build_model
    from ckptsurgery.surgery import Gate

    built = build_model(target.model, target.model_args)
    gate = Gate(
        built,
        allow_missing=target.allow_missing,
        allow_unexpected=target.allow_unexpected,
        drop_mismatched=target.drop_mismatched,
    )
    return gate, built.note
