"""The only place that reads or writes checkpoint bytes."""

from ckptsurgery.io.atomic import atomic_write, check_output_path
from ckptsurgery.io.detect import SAFETENSORS, TORCH_LEGACY, TORCH_ZIP, detect_format
from ckptsurgery.io.dtypes import TensorInfo
from ckptsurgery.io.reader import Checkpoint, TensorDictSource, open_checkpoint
from ckptsurgery.io.writer import WriteResult, output_format, write_checkpoint

__all__ = [
    "SAFETENSORS",
    "TORCH_LEGACY",
    "TORCH_ZIP",
    "Checkpoint",
    "TensorDictSource",
    "TensorInfo",
    "WriteResult",
    "atomic_write",
    "check_output_path",
    "detect_format",
    "open_checkpoint",
    "output_format",
    "write_checkpoint",
]
