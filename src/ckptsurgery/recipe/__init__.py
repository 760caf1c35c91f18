"""Recipes: a whole surgery written down once in TOML, and run with ``ckptsurgery apply``.

::

    # ckptsurgery apply moco_to_resnet50.toml
    [[source]]                    # one or more; each with its own key and rules, as in remap
    path = "moco_v2.pth.tar"      # relative to this file's folder
    key = "state_dict"
    keep = ["module.encoder_q.*"]
    drop = ["module.encoder_q.fc.*"]
    strip_prefix = ["module.encoder_q."]

    [[source]]
    path = "head.safetensors"

    [[adapt]]                     # optional shape adapters, on the output names
    op = "rows"                   # rows | in-chans | resample-pos-embed
    key = "fc.*"
    indices = "0-9"               # or [0, 1, 2], or indices_file = "classes.txt"

    [[lora]]                      # optional: a peft LoRA adapter folded in, as merge --lora
    path = "my-lora"              # its folder (adapter_config.json + adapter_model.*)

    [merge]                       # optional
    on_conflict = "error"         # error | first | last
    average = false
    weights = []
    # method = "ties"             # or: task arithmetic, TIES or DARE of fine-tunes into a base
    # base = "base.safetensors"   # the [[source]] that is the base; weights: one per other
    # density = 0.5               # ties / dare-*: fraction kept; lambda = 1.0; seed = 0 (DARE)

    [target]                      # optional gate, as remap --model
    model = "torchvision:resnet50"
    model_args = { num_classes = 10 }
    allow_missing = []
    allow_unexpected = []
    drop_mismatched = false

    [output]
    path = "resnet50_moco.safetensors"
    format = "safetensors"        # optional; else from the extension
    # max_shard_size = "5GB"      # optional: path is then a folder of safetensors shards
                                  # and model.safetensors.index.json
    # dtype = "bfloat16"          # optional: float32 | float16 | bfloat16
    # keep_dtype = ["*.running_*"]  # optional, only with dtype: tensors that keep their dtype

A recipe is checked whole before any checkpoint is read: every malformed field gets its own
message, naming the field, its line and the allowed values, and they are reported together.
Trust (``--allow-global``, ``--unsafe-pickle``) is never read from a recipe, only given on the
command line: a recipe is a file people share.

``dtype`` and ``keep_dtype`` are read and checked, and kept on :class:`Recipe`;
:func:`apply_recipe` does not cast yet.

The package's modules: :mod:`.model` (the parsed recipe), :mod:`.read` (TOML to a checked
:class:`Recipe`; :mod:`.check_in` checks ``[[source]]`` and ``[merge]``, :mod:`.check_adapt`
``[[adapt]]``, :mod:`.check_out` ``[target]`` and ``[output]``, and :mod:`.problems` collects what they find), :mod:`.run`
(:func:`apply_recipe`) and :mod:`.write` (:func:`recipe_toml`).
The names below are imported on first use, so ``import ckptsurgery.recipe`` costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptsurgery._lazy import lazy_exports

if TYPE_CHECKING:
    from ckptsurgery.recipe.model import Recipe, RecipeError, RecipeResult, Target
    from ckptsurgery.recipe.read import load_recipe, parse_recipe
    from ckptsurgery.recipe.run import apply_recipe
    from ckptsurgery.recipe.write import recipe_toml

# Public name -> the module that defines it. Keep in step with the imports above.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ["Recipe", "RecipeError", "RecipeResult", "Target"], "ckptsurgery.recipe.model"
    ),
    **dict.fromkeys(["load_recipe", "parse_recipe"], "ckptsurgery.recipe.read"),
    "apply_recipe": "ckptsurgery.recipe.run",
    "recipe_toml": "ckptsurgery.recipe.write",
}

__all__ = [
    "Recipe",
    "RecipeError",
    "RecipeResult",
    "Target",
    "apply_recipe",
    "load_recipe",
    "parse_recipe",
    "recipe_toml",
]

if not TYPE_CHECKING:
    # Hidden from type checkers, which would otherwise accept any ``recipe.<name>`` as Any.
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), __all__)
