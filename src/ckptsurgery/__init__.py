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
    "Checkpoint",
    "CheckpointError",
    "FormatError",
    "IncompatibleCheckpoint",
    "KeyCollisionError",
    "KeyPlan",
    "OutputError",
    "RuleError",
    "Rules",
    "SourceError",
    "StateDictSelectionError",
    "TensorInfo",
    "UnsafePickleError",
    "__version__",
    "load_state_dict",
    "open_checkpoint",
    "remap",
    "save_state_dict",
]
