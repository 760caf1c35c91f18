"""Running a recipe: read every source through its rules, merge or average, gate, write."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckptsurgery._types import PathLike
from ckptsurgery.errors import MergeError
from ckptsurgery.merge import normalise_weights
from ckptsurgery.plan.model import SourceSpec
from ckptsurgery.plan.run import Progress, run_surgery
from ckptsurgery.recipe.model import RecipeResult, Target
from ckptsurgery.recipe.read import load_recipe

if TYPE_CHECKING:
    from ckptsurgery.plan.gate import Gate


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
    progress: Progress | None = None,
) -> RecipeResult:
    """Run the recipe at ``path``: read every source through its rules, merge (or average),
    gate against the target, and write the output with its provenance.

    ``key`` is the state dict path for sources whose ``[[source]]`` gives none. A dry run
    plans everything (the gate included) and writes nothing. Applying a recipe twice to the
    same inputs writes byte-identical files (the provenance holds no time).
    ``max_shard_size`` overrides the recipe's ``[output] max_shard_size``. The recipe's
    ``[output] dtype`` and ``keep_dtype`` cast as ``remap --dtype`` does; its ``[[adapt]]``
    tables adapt the output tensors' shapes as ``remap --rows`` and the like do; its
    ``[[lora]]`` adapter is folded as ``merge --lora`` does.
    ``progress(done, total)`` is called with the bytes written so far.
    """
    recipe = load_recipe(path)
    sources = [s if s.key is not None else SourceSpec(s.path, key, s.rules) for s in recipe.sources]
    gate, note = _gate(recipe.target)
    provenance: dict[str, Any] = {"recipe": {"name": recipe.path.name, "sha256": recipe.sha256}}
    if recipe.target is not None:
        provenance["target"] = recipe.target.to_dict()  # with its model_args
    weights = None
    mode = "average" if recipe.average else "union"
    method = recipe.method
    if method is not None:
        mode = "method"
        sources.insert(0, sources.pop(method.base))  # the base is the plan's source 0
    if recipe.average:
        if len(sources) < 2:
            raise MergeError("averaging needs at least two sources")
        weights = normalise_weights(recipe.weights or None, len(sources))
        if recipe.weights:
            provenance["weights_given"] = list(recipe.weights)
    result = run_surgery(
        sources,
        recipe.output,
        mode=mode,
        on_conflict=recipe.on_conflict,
        weights=weights,
        dtype=recipe.dtype,
        keep_dtype=recipe.keep_dtype,
        format=recipe.format,
        force=force,
        dry_run=dry_run,
        gate=gate,
        allow_globals=allow_globals,
        unsafe_pickle=unsafe_pickle,
        provenance_extra=provenance,
        verify=verify,
        max_shard_size=recipe.max_shard_size if max_shard_size is None else max_shard_size,
        progress=progress,
        adapters=recipe.adapters,
        method=method.op if method is not None else None,
        lora=recipe.lora[0] if recipe.lora else None,
    )
    return RecipeResult(recipe, result, note)


def _gate(target: Target | None) -> tuple[Gate | None, str | None]:
    if target is None:
        return None, None
    from ckptsurgery.models import build_model
    from ckptsurgery.plan.gate import Gate

    built = build_model(target.model, target.model_args)
    gate = Gate(
        built,
        allow_missing=target.allow_missing,
        allow_unexpected=target.allow_unexpected,
        drop_mismatched=target.drop_mismatched,
    )
    return gate, built.note
