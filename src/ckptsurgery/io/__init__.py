"""The only place that reads or writes checkpoint bytes.

The names below are imported on first use, so reading a checkpoint does not import the
writing side (atomic files, sharding, the writers) and the reverse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptsurgery._lazy import lazy_exports

if TYPE_CHECKING:
    from ckptsurgery.io.atomic import atomic_write, check_output_folder, check_output_path
    from ckptsurgery.io.base import Checkpoint
    from ckptsurgery.io.detect import (
        DCP,
        SAFETENSORS,
        SHARDED_INDEX,
        TORCH_LEGACY,
        TORCH_ZIP,
        detect_format,
    )
    from ckptsurgery.io.dtypes import TensorInfo
    from ckptsurgery.io.memory import TensorDictSource
    from ckptsurgery.io.reader import identity_file, open_checkpoint
    from ckptsurgery.io.sharded import parse_size
    from ckptsurgery.io.streams import FileDigest
    from ckptsurgery.io.writer import Deferred, WriteResult, output_format, write_checkpoint

# Public name -> the module that defines it. Keep in step with the imports above.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ["atomic_write", "check_output_folder", "check_output_path"], "ckptsurgery.io.atomic"
    ),
    "Checkpoint": "ckptsurgery.io.base",
    **dict.fromkeys(
        ["DCP", "SAFETENSORS", "SHARDED_INDEX", "TORCH_LEGACY", "TORCH_ZIP", "detect_format"],
        "ckptsurgery.io.detect",
    ),
    "TensorInfo": "ckptsurgery.io.dtypes",
    "TensorDictSource": "ckptsurgery.io.memory",
    **dict.fromkeys(["identity_file", "open_checkpoint"], "ckptsurgery.io.reader"),
    "parse_size": "ckptsurgery.io.sharded",
    "FileDigest": "ckptsurgery.io.streams",
    **dict.fromkeys(
        ["Deferred", "WriteResult", "output_format", "write_checkpoint"], "ckptsurgery.io.writer"
    ),
}

__all__ = [
    "DCP",
    "SAFETENSORS",
    "SHARDED_INDEX",
    "TORCH_LEGACY",
    "TORCH_ZIP",
    "Checkpoint",
    "Deferred",
    "FileDigest",
    "TensorDictSource",
    "TensorInfo",
    "WriteResult",
    "atomic_write",
    "check_output_folder",
    "check_output_path",
    "detect_format",
    "identity_file",
    "open_checkpoint",
    "output_format",
    "parse_size",
    "write_checkpoint",
]

if not TYPE_CHECKING:
    # Hidden from type checkers, which would otherwise accept any ``io.<name>`` as Any.
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), __all__)
