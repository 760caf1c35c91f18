"""One checkpoint file of a known format: safetensors, a torch zip or a legacy torch file.

Below :mod:`ckptsurgery.io.sharded`, which opens its shards through :func:`open_file`, and
:mod:`ckptsurgery.io.reader`, which recognises what a path holds.
"""

from __future__ import annotations

from pathlib import Path

from ckptsurgery.errors import FormatError, StateDictSelectionError
from ckptsurgery.io.base import Checkpoint
from ckptsurgery.io.detect import SAFETENSORS, TORCH_LEGACY, TORCH_ZIP
from ckptsurgery.io.safetensors_format import SafetensorsCheckpoint


def open_file(
    p: Path, fmt: str, *, key: str | None, allow_globals: tuple[str, ...], unsafe_pickle: bool
) -> Checkpoint:
    """One checkpoint file of a known format (checked by :func:`check_source_path`)."""
    if fmt == SAFETENSORS:
        if key:
            # A --key mistake, like a --key that leads nowhere in a torch file.
            raise StateDictSelectionError(
                f"{str(p)!r} is a safetensors file, which holds one flat state dict; "
                "--key does not apply to it (leave it out)"
            )
        return SafetensorsCheckpoint(p)
    if fmt not in (TORCH_ZIP, TORCH_LEGACY):
        raise FormatError(f"{str(p)!r} is a {fmt}, not a checkpoint file")
    if fmt == TORCH_ZIP and not unsafe_pickle and not allow_globals:
        # Most torch files hold only tensors and plain containers: their pickle is read
        # without torch, and tensor bytes are copied straight from the archive. A file that
        # needs more (or a user who trusts more) goes through torch's weights-only unpickler.
        from ckptsurgery.io.torchpickle import Unsupported
        from ckptsurgery.io.torchzip import TorchZipCheckpoint

        try:
            return TorchZipCheckpoint(p, key=key)
        except Unsupported:
            pass  # more than the stand-ins know: torch's weights-only unpickler decides
    from ckptsurgery.io.torchfile import TorchCheckpoint

    return TorchCheckpoint(
        p, fmt, key=key, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
    )
