"""List the globals a torch file's pickle would import, without unpickling anything.

The pickle opcodes are walked with :mod:`pickletools` (a disassembler: it builds no object),
so a malicious file is read as data only. ``GLOBAL`` names its target inline; for
``STACK_GLOBAL`` the module and name are the two most recent strings pushed or fetched from
the memo, which is how torch and picklescan resolve it too.
"""

from __future__ import annotations

import io
import os
import pickletools
from dataclasses import dataclass
from pathlib import Path

from ckptsurgery._types import PathLike
from ckptsurgery.errors import FormatError
from ckptsurgery.io.detect import (
    SAFETENSORS,
    SHARDED_INDEX,
    TORCH_ZIP,
    check_source_path,
    detect_format,
)
from ckptsurgery.io.safetensors_format import read_header
from ckptsurgery.io.streams import crcs_of_spans
from ckptsurgery.io.ziparchive import ZipArchive

# Globals that give a pickle code execution or file/process access: allowlisting one of them
# is trusting the whole file, so the tool never suggests --allow-global for them.
_DANGEROUS_MODULES = (
    "os", "posix", "nt", "subprocess", "sys", "shutil", "pathlib", "socket", "runpy",
    "importlib", "pickle", "_pickle", "marshal", "ctypes", "code", "codeop", "pty",
    "webbrowser", "multiprocessing", "asyncio", "types", "functools", "operator", "io",
    "tempfile", "urllib", "http", "requests", "torch.hub", "torch.jit", "torch.package",
)  # fmt: skip
_DANGEROUS_BUILTINS = {
    "eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "__import__",
    "globals", "locals", "vars", "breakpoint", "input", "apply", "execfile", "file",
}  # fmt: skip


def is_dangerous(name: str) -> bool:
    """True for a global that can run code or touch files and processes when called."""
    module, _, attr = name.rpartition(".")
    if module in ("builtins", "__builtin__"):
        return attr in _DANGEROUS_BUILTINS
    return any(module == m or module.startswith(m + ".") for m in _DANGEROUS_MODULES)


@dataclass(frozen=True)
class GlobalRef:
    name: str  # module.qualname
    safe: bool  # allowed by torch's weights-only unpickler (default or user allowlist)

    @property
    def dangerous(self) -> bool:
        return not self.safe and is_dangerous(self.name)

    @property
    def verdict(self) -> str:
        return "safe" if self.safe else "DANGEROUS" if self.dangerous else "unsafe"


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
                    name = _python3_name(*arg.split(" ", 1))
                    if name not in found:
                        found.append(name)
                elif op.name == "STACK_GLOBAL":
                    name = ".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>"
                    if name not in found:
                        found.append(name)
        except (ValueError, EOFError, KeyError) as e:
            raise FormatError(f"{source}: malformed pickle ({e})") from None
    return found


def _python3_name(module: str, name: str = "") -> str:
    """The global a ``GLOBAL`` opcode really imports under Python 3, as torch resolves it.

    torch.save pickles with protocol 2, which writes Python 2 module names
    (``__builtin__ set``); both pickle and torch's weights-only unpickler map them back.
    """
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING

    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


def scan_file(path: PathLike) -> tuple[str, list[GlobalRef]]:
    """The format of ``path`` and the pickle globals it references, each marked safe or not."""
    p = check_source_path(path)
    fmt = detect_format(p)
    if fmt == SHARDED_INDEX:
        raise FormatError(
            f"{str(p)!r} is a sharded checkpoint's index, which holds no pickle; scan its "
            "torch shards one by one"
        )
    if fmt == SAFETENSORS:
        # No pickle inside, but a broken file must not pass for a clean one.
        with open(p, "rb") as f:
            read_header(f, p.stat().st_size, source=str(p))
        return fmt, []
    if fmt == TORCH_ZIP:
        names = pickle_globals(_checked_zip_pickle(p), source=str(p))
    else:
        # legacy: magic number, protocol version, sys info, the object, the storage keys
        names = pickle_globals(p.read_bytes(), source=str(p), max_pickles=5)
    allowed = _allowed_globals()
    return fmt, [GlobalRef(n, n in allowed) for n in names]


def _checked_zip_pickle(p: Path) -> bytes:
    """The archive's ``data.pkl``, after the CRC-32 of every member has been checked.

    ``inspect`` and the other readers check the records they read (``data.pkl`` always, a
    tensor's record when its bytes are copied); a security check must vouch for the whole
    file, so every record is read here, window by window through a memory map.
    """
    from ckptsurgery.io.torchzip import archive_prefix

    with open(p, "rb") as f:
        zf = ZipArchive(f, base=0, length=os.fstat(f.fileno()).st_size, source=repr(str(p)))
        prefix = archive_prefix(zf)
        spans = [(name, zf.data_offset(name), rec.size) for name, rec in zf.records.items()]
        for name, crc in crcs_of_spans(f, spans, what=str(p)).items():
            zf.check_crc(name, crc)
        return zf.read(prefix + "data.pkl")


def _allowed_globals() -> set[str]:
    from torch import _weights_only_unpickler as wou

    allowed: set[str] = set(wou._get_allowed_globals())
    allowed |= set(wou._get_user_allowed_globals())  # type: ignore[no-untyped-call]
    return allowed
