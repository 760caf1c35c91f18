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
from ckptsurgery.rules import KeyPlan, Rules
from ckptsurgery.surgery import load_state_dict, remap, save_state_dict

__all__ = [
    "BuiltModel",
    "Checkpoint",
    "CheckpointError",
    "DtypeMismatch",
    "FormatError",
    "IncompatibleCheckpoint",
    "KeyCollisionError",
    "KeyPlan",
    "MatchReport",
    "ModelSpecError",
    "OutputError",
    "RuleError",
    "Rules",
    "ShapeMismatch",
    "SourceError",
    "StateDictSelectionError",
    "Suggestion",
    "TensorInfo",
    "UnsafePickleError",
    "UnsafePickleWarning",
    "__version__",
    "build_model",
    "group_keys",
    "load_into",
    "load_state_dict",
    "match",
    "open_checkpoint",
    "parse_model_args",
    "remap",
    "save_state_dict",
    "suggest",
]
