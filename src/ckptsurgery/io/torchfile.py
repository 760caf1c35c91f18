"""Reading torch files without ever running pickled code by accident.

Everything goes through ``torch.load(weights_only=True)``: torch's restricted unpickler, which
builds tensors and plain containers and refuses any other global. A refusal becomes an
:class:`UnsafePickleError` naming the globals and the two ways out (``--allow-global`` for one
trusted class, ``--unsafe-pickle`` for a trusted file). Nothing falls back to unsafe loading.
:class:`TorchCheckpoint` is the state dict of a file loaded that way.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

from ckptsurgery.errors import CheckpointError, FormatError, SourceError, UnsafePickleError
from ckptsurgery.io.detect import TORCH_ZIP
from ckptsurgery.io.memory import TensorDictSource
from ckptsurgery.state_dict import select_state_dict

MIN_TORCH = (2, 10)  # weights_only escapes (CVE-2025-32434, CVE-2026-24747) fixed


class UnsafePickleWarning(UserWarning):
    """Emitted when a file is unpickled with code execution allowed."""


def check_torch_version() -> None:
    import torch

    found = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    if found < MIN_TORCH:
        raise SourceError(
            f"torch {torch.__version__} is too old to load untrusted checkpoints safely "
            f"(weights_only has known escapes before {'.'.join(map(str, MIN_TORCH))}); "
            "upgrade torch"
        )


def resolve_global(name: str) -> Any:
    """``"argparse.Namespace"`` -> the class, importing the longest module prefix."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise SourceError(
        f"--allow-global {name!r}: cannot import it; give module.Name of an importable global"
    )


def _check_archive(path: Path) -> None:
    """Validate the archive before torch reads it: stored members only, no duplicates, sizes
    within the file, a data.pkl, not TorchScript (:mod:`ckptsurgery.io.ziparchive`)."""
    from ckptsurgery.io.torchzip import open_archive

    try:
        with open(path, "rb") as f:
            open_archive(f, base=0, length=os.fstat(f.fileno()).st_size, source=repr(str(path)))
    except OSError as e:
        raise SourceError(f"{str(path)!r} cannot be read: {e.strerror}") from None


# A cut or corrupted GLOBAL opcode can read as a name like "torc." or ".": damage, not a class.
_DOTTED_NAME_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _unsafe_globals(path: Path, trusted: list[Any]) -> list[str]:
    """Every global the file needs beyond the weights-only set, found without unpickling.

    The pickle is disassembled as data (:mod:`ckptsurgery.io.scan`). An empty list means the
    refusal was not about a global: the pickle itself is truncated or malformed.
    """
    from ckptsurgery.io.scan import scan_file

    # torch keys its allowlist by module and qualified name, as the pickle names a global.
    trusted_names = {
        f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', '')}" for t in trusted
    }
    try:
        _, refs = scan_file(path)
    except CheckpointError:  # too damaged to disassemble: malformed, whatever torch tripped on
        return []
    return [
        r.name
        for r in refs
        if not r.safe and r.name not in trusted_names and _DOTTED_NAME_RE.fullmatch(r.name)
    ]


def load_torch(path: Path, fmt: str, *, allow_globals: tuple[str, ...], unsafe_pickle: bool) -> Any:
    """``torch.load`` with weights_only semantics (mmap for zip archives), errors explained."""
    import torch

    check_torch_version()
    if fmt == TORCH_ZIP:
        _check_archive(path)
    trusted = [resolve_global(g) for g in allow_globals]
    if unsafe_pickle:
        warnings.warn(
            f"{path}: unpickling with code execution allowed (--unsafe-pickle); "
            "only do this for files you trust",
            UnsafePickleWarning,
            stacklevel=2,
        )
    try:
        with torch.serialization.safe_globals(trusted):
            # torch.load hands any *path* ending in ".safetensors" to safetensors, whatever
            # the content; a torch zip under that name is read through a file object instead.
            if fmt == TORCH_ZIP and not str(path).endswith(".safetensors"):
                # mmap keeps tensor data on disk until a tensor is touched; torch only maps
                # a path, which is safe here because the format was checked from the content.
                return torch.load(
                    str(path), map_location="cpu", weights_only=not unsafe_pickle, mmap=True
                )
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=not unsafe_pickle)
    except pickle.UnpicklingError as e:
        message = str(e)
        # With weights_only, torch reports every pickle failure this way, a truncated or
        # corrupt pickle as much as a refused global; the file's content tells them apart.
        names = _unsafe_globals(path, trusted) if not unsafe_pickle else []
        if not names:
            inner = _inner_error(message)
            if inner.startswith("Unsupported operand"):
                # A valid pickle using opcodes torch's restricted unpickler lacks (protocol > 2).
                raise FormatError(
                    f"{str(path)!r}: the pickle is corrupt or uses an opcode the weights-only "
                    f"unpickler does not support ({inner}); if the file is intact and you trust "
                    "it, pass --unsafe-pickle"
                ) from None
            raise FormatError(f"{str(path)!r}: truncated or malformed pickle ({inner})") from None
        raise UnsafePickleError(_refusal(path, names), globals_=tuple(names)) from None
    except SourceError:
        raise
    except Exception as e:  # a damaged file can make torch's reader fail in any way at all
        raise FormatError(
            f"{str(path)!r}: truncated or malformed torch file ({type(e).__name__}: "
            f"{_first_line(str(e))})"
        ) from None


class TorchCheckpoint(TensorDictSource):
    """A torch file's state dict, loaded by :func:`load_torch` and selected by ``key``."""

    def __init__(
        self,
        path: Path,
        fmt: str,
        *,
        key: str | None,
        allow_globals: tuple[str, ...],
        unsafe_pickle: bool,
    ) -> None:
        self.path = path
        self.format = fmt
        self.metadata = {}
        obj = load_torch(path, fmt, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle)
        sel = select_state_dict(obj, key, source=str(path))
        self.key = sel.key
        self.other_entries = sel.other_entries
        self._init_tensors(sel.state_dict, source=str(path))


def _refusal(path: Path, names: list[str]) -> str:
    from ckptsurgery.io.scan import is_dangerous

    risky = [n for n in names if is_dangerous(n)]
    if risky:
        # Allowlisting os.system or getattr is trusting the file: do not suggest it.
        return (
            f"{str(path)!r}: refusing to unpickle {', '.join(names)}; {', '.join(risky)} can "
            "run code or touch files, so this file may be malicious. Do not load it unless "
            f"you trust its source: --allow-global {risky[0]} or --unsafe-pickle would let it run"
        )
    flags = " ".join(f"--allow-global {n}" for n in names)
    return (
        f"{str(path)!r}: refusing to unpickle {', '.join(names)} (not allowed when loading "
        f"weights only); pass {flags} to trust {'that global' if len(names) == 1 else 'them'}, "
        "or --unsafe-pickle if you trust the whole file"
    )


def _inner_error(message: str) -> str:
    """The unpickler's own complaint inside torch's long weights-only message."""
    _, sep, inner = message.partition("WeightsUnpickler error:")
    return _first_line(inner if sep else message)


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:300]
