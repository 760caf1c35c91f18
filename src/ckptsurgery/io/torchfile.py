"""Reading torch files without ever running pickled code by accident.

Everything goes through ``torch.load(weights_only=True)``: torch's restricted unpickler, which
builds tensors and plain containers and refuses any other global. A refusal becomes an
:class:`UnsafePickleError` naming the globals and the two ways out (``--allow-global`` for one
trusted class, ``--unsafe-pickle`` for a trusted file). Nothing falls back to unsafe loading.
"""

from __future__ import annotations

import importlib
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

from ckptsurgery.errors import FormatError, SourceError, UnsafePickleError
from ckptsurgery.io.detect import TORCH_ZIP

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
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise FormatError(
            f"{str(path)!r}: truncated or malformed torch zip archive ({e})"
        ) from None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise FormatError(
            f"{str(path)!r} is a TorchScript archive (torch.jit.save), not a checkpoint; "
            "load it with torch.jit.load, save its state_dict() with torch.save, then retry"
        )
    pkls = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkls) != 1:
        raise FormatError(
            f"{str(path)!r}: a torch archive holds exactly one data.pkl, this one {len(pkls)}"
        )


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)|global ([\w.]+)|Unsupported class ([\w.]+)")


def _unsafe_globals(path: Path, fmt: str, message: str) -> list[str]:
    import torch

    found: list[str] = []
    if fmt == TORCH_ZIP:
        try:
            with open(path, "rb") as f:
                found = torch.serialization.get_unsafe_globals_in_checkpoint(f)
        except Exception:  # the listing is a courtesy; the refusal stands regardless
            found = []
    if not found:
        for m in _GLOBAL_RE.finditer(message):
            name = next(g for g in m.groups() if g)
            if name not in found:
                found.append(name)
    return found


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
            if fmt == TORCH_ZIP:
                # mmap keeps tensor data on disk until a tensor is touched; torch only maps
                # a path, which is safe here because the format was checked from the content.
                return torch.load(
                    str(path), map_location="cpu", weights_only=not unsafe_pickle, mmap=True
                )
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=not unsafe_pickle)
    except pickle.UnpicklingError as e:
        message = str(e)
        if "Weights only load failed" not in message and "weights_only" not in message:
            raise FormatError(f"{str(path)!r}: malformed pickle ({_first_line(message)})") from None
        names = _unsafe_globals(path, fmt, message)
        shown = ", ".join(names) if names else "a global outside the weights-only set"
        first = names[0] if names else "module.Name"
        raise UnsafePickleError(
            f"{str(path)!r}: refusing to unpickle {shown} (not allowed when loading weights "
            f"only); pass --allow-global {first} to trust that global, or --unsafe-pickle if "
            "you trust the whole file",
            globals_=tuple(names),
        ) from None
    except SourceError:
        raise
    except (
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        zipfile.BadZipFile,
        UnicodeDecodeError,
        MemoryError,
    ) as e:
        raise FormatError(
            f"{str(path)!r}: truncated or malformed torch file ({type(e).__name__}: "
            f"{_first_line(str(e))})"
        ) from None


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:300]
