"""ckptsurgery: PyTorch checkpoint surgery.

Filter and rename the keys of a checkpoint, check it against a model before loading, and
write a loadable file, bit-exact and atomically. The library never imports torch until a
tensor is needed, so reading a safetensors header or planning renames stays cheap.
"""

__version__ = "0.1.0"

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
from ckptsurgery.match import DtypeMismatch, MatchReport, ShapeMismatch, load_into, match
from ckptsurgery.merge import (
    MergeConflictError,
    MergeError,
    MergeResult,
    SourceSpec,
    average,
    average_files,
    merge,
    merge_files,
)
from ckptsurgery.models import BuiltModel, ModelSpecError, build_model, parse_model_args
from ckptsurgery.recipe import Recipe, RecipeError, apply_recipe, load_recipe
from ckptsurgery.rules import KeyPlan, Rules
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

__all__ = [
    "BuiltModel",
    "Checkpoint",
    "CheckpointError",
    "DiffResult",
    "DtypeMismatch",
    "FormatError",
    "Gate",
    "IncompatibleCheckpoint",
    "KeyCollisionError",
    "KeyPlan",
    "MatchReport",
    "MergeConflictError",
    "MergeError",
    "MergeResult",
    "ModelSpecError",
    "OutputError",
    "Recipe",
    "RecipeError",
    "RemapResult",
    "RuleError",
    "Rules",
    "ShapeMismatch",
    "SourceError",
    "SourceSpec",
    "StateDictSelectionError",
    "Suggestion",
    "TensorInfo",
    "TrainConfig",
    "TrainError",
    "TransformConfig",
    "UnsafePickleError",
    "UnsafePickleWarning",
    "__version__",
    "apply_recipe",
    "average",
    "average_files",
    "build_model",
    "diff",
    "evaluate",
    "group_keys",
    "load_into",
    "load_recipe",
    "load_state_dict",
    "match",
    "merge",
    "merge_files",
    "open_checkpoint",
    "parse_model_args",
    "remap",
    "save_state_dict",
    "suggest",
    "train",
]
