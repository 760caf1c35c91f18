"""One entry function per parser: ``HARNESSES[name](data)`` parses ``data`` as that format.

An entry function returns when the input parses (every tensor's bytes are then read too) or
when the parser refuses it with the project's own error (:class:`CheckpointError`, which the
CLI turns into one ``Error:`` line and exit code 2). Anything else escapes: that is a crash.
The unpickler harness also fails when an input imports a module, calls a Python function
outside the allow-list, or changes an object of the allow-list.

No atheris here: ``fuzz/run.py`` drives these under the fuzzer, and
``tests/io/test_fuzz_regressions.py`` runs them over the seeds and the regression inputs.
Inputs that are files are written to one scratch folder (tmpfs where there is one).
"""

from __future__ import annotations

import atexit
import builtins
import importlib
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
SUPPORT = Path(os.environ.get("CKPTSURGERY_FUZZ_SUPPORT", HERE / "corpus" / "_support"))

_scratch: Path | None = None


def scratch() -> Path:
    """A private folder for this process's input files (under /dev/shm when it exists)."""
    global _scratch
    if _scratch is None:
        shm = Path("/dev/shm")
        base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
        prefix = f"ckptsurgery-fuzz-{os.getpid()}-"  # run.py removes it: libFuzzer _exit()s
        _scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        atexit.register(shutil.rmtree, _scratch, True)
    return _scratch


def _write(name: str, data: bytes) -> Path:
    path = scratch() / name
    path.write_bytes(data)
    return path


def _folder(name: str, support: str) -> Path:
    """A scratch folder holding a copy of the support files ``support`` (made once)."""
    folder = scratch() / name
    if not folder.is_dir():
        src = SUPPORT / support
        if not src.is_dir():
            raise RuntimeError(f"{src} is missing: run python fuzz/make_corpus.py first")
        shutil.copytree(src, folder)
    return folder


def _read_all(ckpt: Any) -> None:
    """Fetch every tensor's bytes, as a copy would (the parsers' lazy half)."""
    with ckpt:
        for name in list(ckpt.infos):
            data = memoryview(ckpt.raw_bytes(name)).cast("B")
            if len(data) != ckpt.infos[name].nbytes:
                raise AssertionError(f"{name!r}: {len(data)} bytes, infos say {ckpt.infos[name]}")


def _expected() -> type[Exception]:
    from ckptsurgery.errors import CheckpointError

    return CheckpointError


# --- the harnesses --------------------------------------------------------------------------


def safetensors(data: bytes) -> None:
    """The safetensors header and every tensor's byte range (no torch)."""
    from ckptsurgery.io.safetensors_format import SafetensorsCheckpoint

    try:
        _read_all(SafetensorsCheckpoint(_write("input.safetensors", data)))
    except _expected():
        pass


def torch_zip(data: bytes) -> None:
    """A torch zip archive read without torch: zip directory, data.pkl, storage records.

    :class:`Unsupported` is accepted: ``open_file`` then hands the file to torch's
    weights-only unpickler (the ``torch_file`` harness covers that path).
    """
    from ckptsurgery.io.torchpickle import Unsupported
    from ckptsurgery.io.torchzip import TorchZipCheckpoint

    try:  # the pickle itself is the unpickler harness's (and guarded there)
        _read_all(TorchZipCheckpoint(_write("input.pth", data), key=None))
    except (_expected(), Unsupported):
        pass


def torch_file(data: bytes) -> None:
    """Any file through ``open_checkpoint``: format detection, then its reader; legacy torch
    files and archives the stand-ins refuse go through ``torch.load(weights_only=True)``."""
    from ckptsurgery.io.reader import open_checkpoint

    try:
        _read_all(open_checkpoint(_write("input.pt", data)))
    except _expected():
        pass


def unpickler(data: bytes) -> None:
    """The restricted unpickler alone, watched: no import, no call outside the allow-list."""
    from ckptsurgery.io.torchpickle import Unsupported, load_refs, ref_type_name
    from ckptsurgery.io.torchzip import select_refs

    try:
        with guard_unpickling():
            loaded = load_refs(data)
        select_refs(loaded.root, None, source="input")
        ref_type_name(loaded.root)
    except (_expected(), Unsupported):
        pass


def dcp(data: bytes) -> None:
    """A DCP folder whose ``.metadata`` is the input (its data files are real ones)."""
    from ckptsurgery.io.dcp import DcpCheckpoint

    folder = _folder("dcp", "dcp")
    (folder / ".metadata").write_bytes(data)
    try:
        with guard_unpickling():
            ckpt = DcpCheckpoint(folder, key=None)
        _read_all(ckpt)
    except _expected():
        pass


def index_json(data: bytes) -> None:
    """A Hugging Face index (the input) beside real safetensors shards."""
    from ckptsurgery.io.sharded import ShardedCheckpoint

    folder = _folder("sharded", "sharded")
    path = folder / "model.safetensors.index.json"
    path.write_bytes(data)
    try:
        _read_all(ShardedCheckpoint(path, key=None))
    except _expected():
        pass


def recipe(data: bytes) -> None:
    """A recipe file: TOML, then every table checked."""
    from ckptsurgery.recipe.read import load_recipe

    folder = _folder("recipe", "recipe")
    path = folder / "recipe.toml"
    path.write_bytes(data)
    try:
        load_recipe(path)
    except _expected():
        pass


HARNESSES: dict[str, Callable[[bytes], None]] = {
    "safetensors": safetensors,
    "torch_zip": torch_zip,
    "torch_file": torch_file,
    "unpickler": unpickler,
    "dcp": dcp,
    "index_json": index_json,
    "recipe": recipe,
}
# The modules whose code each harness exercises (coverage-instrumented under the fuzzer).
MODULES: dict[str, tuple[str, ...]] = {
    "safetensors": ("ckptsurgery.io.safetensors_format",),
    "torch_zip": ("ckptsurgery.io.torchzip",),
    "torch_file": ("ckptsurgery.io.reader",),
    "unpickler": ("ckptsurgery.io.torchpickle", "ckptsurgery.io.torchzip"),
    "dcp": ("ckptsurgery.io.dcp",),
    "index_json": ("ckptsurgery.io.sharded",),
    "recipe": ("ckptsurgery.recipe.read",),
}


# --- watching the unpicklers ----------------------------------------------------------------


class Violation(AssertionError):
    """An input made an unpickler import, call or change something it must not."""


# Python code an unpickler may call: our stand-ins and their dataclass-made methods.
_ALLOWED_CODE = ("/ckptsurgery/io/torchpickle.py", "/ckptsurgery/io/dcp.py", "<string>")


_allowed: list[object] = []
_allowed_ids: set[int] = set()
_baseline: list[tuple[object, object, object]] = []  # the allow-list's state when first seen


def _allowed_objects() -> list[object]:
    """Every object ``find_class`` may hand out (dcp's dtypes are checked by type)."""
    if not _allowed:
        from ckptsurgery.io import dcp, torchpickle

        _allowed.extend(torchpickle._GLOBALS.values())
        _allowed.extend([*dcp._RECORDS.values(), dcp._SIZE, dcp._LAYOUT, dcp._PATH])
        _allowed.extend([set, frozenset, dict])
    return _allowed


def _allow_list_state() -> list[tuple[object, object, object]]:
    """The mutable parts of every object the unpicklers hand out (a class's attributes, a
    function's defaults, an instance's fields)."""
    from ckptsurgery.io.torchpickle import Sealed

    out: list[tuple[object, object, object]] = []
    for obj in _allowed_objects():
        o = obj._fn if isinstance(obj, Sealed) else obj  # the function inside, too
        out.append(
            (
                dict(vars(o)) if hasattr(o, "__dict__") else None,
                getattr(o, "__defaults__", None),
                getattr(o, "__kwdefaults__", None),
            )
        )
    return out


@contextmanager
def guard_unpickling() -> Iterator[None]:
    """Fail (:class:`Violation`) when an unpickler imports a module, hands out or calls
    anything outside the allow-list while it loads, or changes the allow-list's objects.
    Not thread-safe: the harnesses run one input at a time."""
    from ckptsurgery.io import dcp, torchpickle

    violations: list[str] = []
    if not _baseline:
        _baseline.extend(_allow_list_state())
    before = list(_baseline)
    if not _allowed_ids:
        _allowed_ids.update(id(o) for o in _allowed_objects())
    allowed_ids = _allowed_ids
    real_load = pickle.Unpickler.load

    def load(self: pickle.Unpickler) -> Any:
        real_import = builtins.__import__
        real_import_module = importlib.import_module
        modules = set(sys.modules)

        def no_import(name: str, *args: Any, **kwargs: Any) -> Any:
            violations.append(f"import {name}")
            return real_import(name, *args, **kwargs)

        def no_import_module(name: str, package: str | None = None) -> Any:
            violations.append(f"importlib.import_module({name!r})")
            return real_import_module(name, package)

        def profile(frame: FrameType, event: str, arg: object) -> None:
            # A Python function called by the C unpickler (so from this frame) is one the
            # pickle reached: it must be ours.
            if event != "call" or frame.f_back is None or frame.f_back.f_code is not code:
                return
            path = frame.f_code.co_filename.replace(os.sep, "/")
            if not path.endswith(_ALLOWED_CODE) and not path.endswith("/fuzz/harnesses.py"):
                violations.append(f"call {frame.f_code.co_name} ({frame.f_code.co_filename})")

        builtins.__import__ = no_import
        importlib.import_module = no_import_module
        old_profile = sys.getprofile()
        sys.setprofile(profile)
        try:
            return real_load(self)
        finally:
            sys.setprofile(old_profile)
            builtins.__import__ = real_import
            importlib.import_module = real_import_module
            new = set(sys.modules) - modules
            if new:
                violations.append(f"modules imported: {sorted(new)}")

    code = load.__code__
    patched: list[tuple[type[pickle.Unpickler], Any]] = []
    classes: list[type[pickle.Unpickler]] = [torchpickle._Unpickler, dcp._MetadataUnpickler]
    for cls in classes:
        real = cls.__dict__["find_class"]

        def find_class(self: Any, module: str, name: str, real: Any = real) -> Any:
            found = real(self, module, name)
            if id(found) not in allowed_ids and not isinstance(found, dcp._DType):
                violations.append(f"find_class({module!r}, {name!r}) gave {found!r}")
            return found

        patched.append((cls, real))
        setattr(cls, "find_class", find_class)  # noqa: B010 - patched for this input only
        setattr(cls, "load", load)  # noqa: B010
    try:
        yield
    finally:
        for cls, real in patched:
            setattr(cls, "find_class", real)  # noqa: B010
            delattr(cls, "load")
        after = _allow_list_state()
        for obj, was, now in zip(_allowed_objects(), before, after, strict=True):
            if was != now:
                violations.append(f"the allow-list object {obj!r} changed: {was} -> {now}")
        if before != after:
            _baseline[:] = after  # the next input compares with the changed state
        if violations:  # also when the body raised: the violation is what counts
            raise Violation("; ".join(violations))
