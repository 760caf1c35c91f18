"""Tensor metadata that is known before any tensor byte is read.

Dtypes are carried as torch's names without the ``torch.`` prefix (``"bfloat16"``), so that a
safetensors header can be described, compared and printed without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptsurgery.errors import OutputError

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> (torch dtype name, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "U16": ("uint16", 2),
    "I16": ("int16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "U32": ("uint32", 4),
    "I32": ("int32", 4),
    "F32": ("float32", 4),
    "U64": ("uint64", 8),
    "I64": ("int64", 8),
    "F64": ("float64", 8),
    "C64": ("complex64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
}
TORCH_TO_SAFETENSORS: dict[str, str] = {
    name: code for code, (name, _) in SAFETENSORS_DTYPES.items()
}


@dataclass(frozen=True)
class TensorInfo:
    """Name-independent facts about one stored tensor: shape, dtype and size in bytes."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_floating(self) -> bool:
        return self.dtype.startswith(("float", "bfloat", "complex"))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def info_of(tensor: torch.Tensor) -> TensorInfo:
    return TensorInfo(
        shape=tuple(tensor.shape),
        dtype=dtype_name(tensor.dtype),
        nbytes=tensor.numel() * tensor.element_size(),
    )


def safetensors_code(dtype: str, *, key: str) -> str:
    """The safetensors dtype code for a torch dtype name, or an error that names the fix."""
    code = TORCH_TO_SAFETENSORS.get(dtype)
    if code is None:
        raise OutputError(
            f"tensor {key!r} has dtype {dtype}, which safetensors cannot store; "
            "write a torch file instead (--format torch)"
        )
    return code
