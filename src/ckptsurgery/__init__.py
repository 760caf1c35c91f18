"""ckptsurgery: PyTorch checkpoint surgery.

Filter and rename the keys of a checkpoint, check it against a model before loading, and
write a loadable file, bit-exact and atomically. The library never imports torch until a
tensor is needed, so reading a safetensors header or planning renames stays cheap.

The names below are imported on first use (``cs.merge`` imports :mod:`ckptsurgery.merge`
then), so ``import ckptsurgery`` costs almost nothing and a command pays only for the
modules it uses.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from ckptsurgery._lazy import lazy_exports
from ckptsurgery._version import __version__

if TYPE_CHECKING:
    from ckptsurgery.compare import compare
    from ckptsurgery.errors import (
        CheckpointError,
        FormatError,
        IncompatibleCheckpoint,
        KeyCollisionError,
        OutputError,
        RuleError,
        SourceError,
        StateDictSelectionError,
        UnsafePickleError,
    )
    from ckptsurgery.io import Checkpoint, TensorInfo, open_checkpoint
    from ckptsurgery.io.torchfile import UnsafePickleWarning
    from ckptsurgery.keygroups import group_keys
    from ckptsurgery.loading import load_into
    from ckptsurgery.match import DtypeMismatch, MatchReport, ShapeMismatch, match
    from ckptsurgery.merge import (
        MergeConflictError,
        MergeError,
        MergeResult,
        SourceSpec,
        average,
        average_files,
        fold_lora,
        merge,
        merge_files,
        method_merge,
        method_merge_files,
    )
    from ckptsurgery.models import BuiltModel, ModelSpecError, build_model, parse_model_args
    from ckptsurgery.plan.adapt import InChans, ResamplePosEmbed, Rows
    from ckptsurgery.plan.lora import LoraAdapter, LoraError
    from ckptsurgery.plan.model import Plan
    from ckptsurgery.plan.run import SurgeryResult
    from ckptsurgery.recipe.model import Recipe, RecipeError
    from ckptsurgery.recipe.read import load_recipe
    from ckptsurgery.recipe.run import apply_recipe
    from ckptsurgery.rules import KeyPlan, Rules, UnusedPatternWarning
    from ckptsurgery.suggest import Suggestion, suggest
    from ckptsurgery.surgery import (
        DiffResult,
        Gate,
        RemapResult,
        diff,
        load_state_dict,
        remap,
        save_state_dict,
    )
    from ckptsurgery.train import TrainConfig, TrainError, TransformConfig, evaluate, train
    from ckptsurgery.valuediff import BlockDiff, TensorDiff, ValueDiff

# Public name -> the module that defines it. Keep in step with the imports above.
_EXPORTS: dict[str, str] = {
    "compare": "ckptsurgery.compare",
    **dict.fromkeys(["BlockDiff", "TensorDiff", "ValueDiff"], "ckptsurgery.valuediff"),
    **dict.fromkeys(
        [
            "CheckpointError",
            "FormatError",
            "IncompatibleCheckpoint",
            "KeyCollisionError",
            "OutputError",
            "RuleError",
            "SourceError",
            "StateDictSelectionError",
            "UnsafePickleError",
        ],
        "ckptsurgery.errors",
    ),
    **dict.fromkeys(["Checkpoint", "TensorInfo", "open_checkpoint"], "ckptsurgery.io"),
    "UnsafePickleWarning": "ckptsurgery.io.torchfile",
    "group_keys": "ckptsurgery.keygroups",
    "load_into": "ckptsurgery.loading",
    **dict.fromkeys(
        ["DtypeMismatch", "MatchReport", "ShapeMismatch", "match"], "ckptsurgery.match"
    ),
    **dict.fromkeys(
        [
            "MergeConflictError",
            "MergeError",
            "MergeResult",
            "SourceSpec",
            "average",
            "average_files",
            "fold_lora",
            "merge",
            "merge_files",
            "method_merge",
            "method_merge_files",
        ],
        "ckptsurgery.merge",
    ),
    **dict.fromkeys(
        ["BuiltModel", "ModelSpecError", "build_model", "parse_model_args"], "ckptsurgery.models"
    ),
    **dict.fromkeys(["Recipe", "RecipeError"], "ckptsurgery.recipe.model"),
    "load_recipe": "ckptsurgery.recipe.read",
    "apply_recipe": "ckptsurgery.recipe.run",
    **dict.fromkeys(["InChans", "ResamplePosEmbed", "Rows"], "ckptsurgery.plan.adapt"),
    **dict.fromkeys(["LoraAdapter", "LoraError"], "ckptsurgery.plan.lora"),
    "Plan": "ckptsurgery.plan.model",
    "SurgeryResult": "ckptsurgery.plan.run",
    **dict.fromkeys(["KeyPlan", "Rules", "UnusedPatternWarning"], "ckptsurgery.rules"),
    **dict.fromkeys(["Suggestion", "suggest"], "ckptsurgery.suggest"),
    **dict.fromkeys(
        [
            "DiffResult",
            "Gate",
            "RemapResult",
            "diff",
            "load_state_dict",
            "remap",
            "save_state_dict",
        ],
        "ckptsurgery.surgery",
    ),
    **dict.fromkeys(
        ["TrainConfig", "TrainError", "TransformConfig", "evaluate", "train"], "ckptsurgery.train"
    ),
}

# Literal, for tools that read it without running this file; a test keeps it equal to
# _EXPORTS plus __version__.
__all__ = [
    "BlockDiff",
    "BuiltModel",
    "Checkpoint",
    "CheckpointError",
    "DiffResult",
    "DtypeMismatch",
    "FormatError",
    "Gate",
    "InChans",
    "IncompatibleCheckpoint",
    "KeyCollisionError",
    "KeyPlan",
    "LoraAdapter",
    "LoraError",
    "MatchReport",
    "MergeConflictError",
    "MergeError",
    "MergeResult",
    "ModelSpecError",
    "OutputError",
    "Plan",
    "Recipe",
    "RecipeError",
    "RemapResult",
    "ResamplePosEmbed",
    "Rows",
    "RuleError",
    "Rules",
    "ShapeMismatch",
    "SourceError",
    "SourceSpec",
    "StateDictSelectionError",
    "Suggestion",
    "SurgeryResult",
    "TensorDiff",
    "TensorInfo",
    "TrainConfig",
    "TrainError",
    "TransformConfig",
    "UnsafePickleError",
    "UnsafePickleWarning",
    "UnusedPatternWarning",
    "ValueDiff",
    "__version__",
    "apply_recipe",
    "average",
    "average_files",
    "build_model",
    "compare",
    "diff",
    "evaluate",
    "fold_lora",
    "group_keys",
    "load_into",
    "load_recipe",
    "load_state_dict",
    "match",
    "merge",
    "merge_files",
    "method_merge",
    "method_merge_files",
    "open_checkpoint",
    "parse_model_args",
    "remap",
    "save_state_dict",
    "suggest",
    "train",
]


if not TYPE_CHECKING:
    # Hidden from type checkers, which would otherwise accept any ``cs.<name>`` as Any.
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), __all__)


class _Package(types.ModuleType):
    """Keeps ``cs.merge`` the function once ``ckptsurgery.merge`` the module is imported.

    Importing a submodule sets it as an attribute of its package; five public functions
    (``compare``, ``match``, ``merge``, ``suggest``, ``train``) share their module's name and
    would be hidden by it. The eager imports this package used to do overwrote the module with the
    function; this does the same, lazily.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if (
            isinstance(value, types.ModuleType)
            and value.__name__ == f"{__name__}.{name}"
            and _EXPORTS.get(name) == value.__name__
        ):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
