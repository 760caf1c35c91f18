"""List the globals a torch file's pickle would import, without unpickling anything.

The pickle opcodes are walked with :mod:`pickletools` (a disassembler: it builds no object),
so a malicious file is read as data only. ``GLOBAL`` names its target inline; for
``STACK_GLOBAL`` the module and name are the two most recent strings pushed or fetched from
the memo, which is how torch and picklescan resolve it too.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from dataclasses import dataclass

from ckptsurgery._types import PathLike
from ckptsurgery.errors import FormatError
from ckptsurgery.io.detect import SAFETENSORS, TORCH_ZIP, check_source_path, detect_format


@dataclass(frozen=True)
class GlobalRef:
    name: str  # module.qualname
    safe: bool  # allowed by torch's weights-only unpickler (default or user allowlist)


def pickle_globals(data: bytes, *, source: str, max_pickles: int = 1) -> list[str]:
    """Globals referenced by the first ``max_pickles`` pickles in ``data``, in first-seen order."""
    found: list[str] = []
    stream = io.BytesIO(data)
    for _ in range(max_pickles):
        if stream.tell() >= len(data):
            break
        strings: list[str] = []
        memo: dict[int, str] = {}
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if isinstance(arg, str) and op.name in (
                    "SHORT_BINUNICODE",
                    "BINUNICODE",
                    "BINUNICODE8",
                    "UNICODE",
                    "STRING",
                    "BINSTRING",
                    "SHORT_BINSTRING",
                ):
                    strings.append(arg)
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                    memo[int(arg)] = strings[-1]  # type: ignore[arg-type]
                elif op.name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:  # type: ignore[arg-type]
                    strings.append(memo[int(arg)])  # type: ignore[arg-type]
                elif op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                    name = arg.replace(" ", ".")
                    if name not in found:
                        found.append(name)
                elif op.name == "STACK_GLOBAL":
                    name = ".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>"
                    if name not in found:
                        found.append(name)
        except (ValueError, EOFError, KeyError) as e:
            raise FormatError(f"{source}: malformed pickle ({e})") from None
    return found


def scan_file(path: PathLike) -> tuple[str, list[GlobalRef]]:
    """The format of ``path`` and the pickle globals it references, each marked safe or not."""
    p = check_source_path(path)
    fmt = detect_format(p)
    if fmt == SAFETENSORS:
        return fmt, []
    if fmt == TORCH_ZIP:
        try:
            with zipfile.ZipFile(p) as zf:
                pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                if len(pkl) != 1:
                    raise FormatError(f"{str(p)!r}: expected one data.pkl, found {len(pkl)}")
                data = zf.read(pkl[0])
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise FormatError(
                f"{str(p)!r}: truncated or malformed torch zip archive ({e})"
            ) from None
        names = pickle_globals(data, source=str(p))
    else:
        # legacy: magic number, protocol version, sys info, the object, the storage keys
        names = pickle_globals(p.read_bytes(), source=str(p), max_pickles=5)
    allowed = _allowed_globals()
    return fmt, [GlobalRef(n, n in allowed) for n in names]


def _allowed_globals() -> set[str]:
    from torch import _weights_only_unpickler as wou

    allowed: set[str] = set(wou._get_allowed_globals())
    allowed |= set(wou._get_user_allowed_globals())  # type: ignore[no-untyped-call]
    return allowed
