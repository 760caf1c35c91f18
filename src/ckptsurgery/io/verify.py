"""Reading back a checkpoint just written, before it takes its name.

The writer keeps, for every tensor it stores, the CRC-32 of the bytes it wrote (computed on
the way, or the source archive's own verified record CRC when the bytes are copied whole).
:func:`verify_written` re-opens the temporary file (or folder) through the same reader every
command uses and checks that it holds exactly the names, shapes, dtypes and ties that were
meant, and that each tensor's bytes hash as they did when written. The source is not read
again, and memory stays flat: each tensor is hashed in place, window by window.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ckptsurgery.errors import CheckpointError, OutputError
from ckptsurgery.io.dtypes import TensorInfo


@dataclass
class Expected:
    """What a write meant to produce."""

    infos: dict[str, TensorInfo]  # every name, tied aliases included
    aliases: dict[str, str]  # tied name -> the name stored
    crcs: dict[str, int] = field(default_factory=dict)  # stored name -> CRC-32 of its bytes


def verify_written(path: Path, expected: Expected, *, out: Path) -> None:
    """Re-open ``path`` (the temporary output; a folder's index for shards) and compare it
    with ``expected``; :class:`OutputError` naming ``out`` and the first difference."""
    from ckptsurgery.io.reader import open_checkpoint

    def failed(problem: str) -> OutputError:
        return OutputError(
            f"verifying {str(out)!r} after writing it failed: {problem}; nothing was written "
            "(check the disk and retry)"
        )

    try:
        ckpt = open_checkpoint(path)
    except CheckpointError as e:
        raise failed(f"it does not read back ({_short(e, path)})") from None
    with ckpt:
        _compare_names(ckpt.infos, expected.infos, failed)
        for name, info in expected.infos.items():
            got = ckpt.infos[name]
            if got.shape != info.shape or got.dtype != info.dtype:
                raise failed(
                    f"tensor {name!r} reads back as {got.dtype} {list(got.shape)}, "
                    f"{info.dtype} {list(info.shape)} was written"
                )
        for name, info in expected.infos.items():
            want = expected.aliases.get(name, name)
            # an empty tensor holds no bytes to share: readers of torch files never tie one
            if info.nbytes and ckpt.canonical(name) != want:
                raise failed(f"tensor {name!r} does not read back tied to {want!r}")
        try:
            got_crcs = ckpt.data_crcs(expected.crcs)
        except CheckpointError as e:
            raise failed(_short(e, path)) from None
        for name, crc in expected.crcs.items():
            got_crc = got_crcs[name]
            if got_crc != crc:
                raise failed(
                    f"the bytes of tensor {name!r} read back with CRC-32 {got_crc:08x}, "
                    f"not the {crc:08x} written"
                )


def _compare_names(
    got: Mapping[str, TensorInfo],
    want: Mapping[str, TensorInfo],
    failed: Callable[[str], OutputError],
) -> None:
    missing = [n for n in want if n not in got]
    extra = [n for n in got if n not in want]
    if missing or extra:
        what = f"tensor {missing[0]!r} is missing" if missing else f"it holds an extra {extra[0]!r}"
        raise failed(f"{what} ({len(missing)} missing, {len(extra)} unexpected)")


def _short(e: BaseException, path: Path) -> str:
    # the temporary name means nothing to the user: the message names the output instead
    return str(e).replace(repr(str(path)), "the file").replace(str(path), "the file")
