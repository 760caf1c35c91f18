"""The only place that reads or writes checkpoint bytes."""

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
from ckptsurgery.io.reader import TensorDictSource, identity_file, open_checkpoint
from ckptsurgery.io.sharded import parse_size
from ckptsurgery.io.streams import FileDigest
from ckptsurgery.io.writer import Deferred, WriteResult, output_format, write_checkpoint

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
