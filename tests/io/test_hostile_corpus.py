"""A corpus of hostile and broken sources, built here, run through the real CLI.

Every case must end the same way whatever the command (``inspect``, ``remap``,
``diff --against``, ``scan`` where listed): exit code 2, exactly one ``Error:`` line on stderr, no traceback, no
output file (nor a temporary one) and the input's bytes unchanged. Pickles that try to run
code touch a marker file when they do: it must never appear. Cases the readers do not refuse
yet are marked ``xfail(strict=True)`` so the gap stays visible and closes loudly.

The tail of the file tests the top-level handler itself: any exception, raised anywhere
under a command, becomes one ``Error:`` line (``--debug`` shows the traceback), and SIGTERM
behaves like Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import cli_run

MARKER = "PWNED"  # created in the case's folder by any pickle that manages to run code


# --- pickles whose __reduce__ runs code ------------------------------------------------------


class SystemCall:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class ExecCall(SystemCall):
    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


class EvalCall(SystemCall):
    def __reduce__(self) -> tuple[Any, ...]:
        return (eval, (f"open({self.marker!r}, 'w').close()",))


class SubprocessCall(SystemCall):
    def __reduce__(self) -> tuple[Any, ...]:
        return (subprocess.call, (["touch", self.marker],))


class PopenCall(SystemCall):
    def __reduce__(self) -> tuple[Any, ...]:
        return (subprocess.Popen, (["touch", self.marker],))


PAYLOADS: dict[str, type[SystemCall]] = {
    "os.system": SystemCall,
    "exec": ExecCall,
    "eval": EvalCall,
    "subprocess.call": SubprocessCall,
    "subprocess.Popen": PopenCall,
}


def _weights() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}


def _torch_bytes(obj: object, *, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


# --- safetensors built byte by byte ----------------------------------------------------------


def _st(header: bytes | str | Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file: the length field, the header (JSON-encoded unless bytes), data."""
    if isinstance(header, str):
        raw = header.encode()
    elif isinstance(header, bytes):
        raw = header
    else:
        raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _t(dtype: str, shape: Any, begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GOOD_HEADER = {"a": _t("F32", [2], 0, 8), "b": _t("F32", [1], 8, 12)}
GOOD_DATA = bytes(12)


def _st_raw_field(field_text: str, *, where: str) -> bytes:
    """A one-tensor header whose shape or offsets are written as raw JSON text."""
    if where == "shape":
        text = f'{{"a":{{"dtype":"F32","shape":{field_text},"data_offsets":[0,8]}}}}'
    else:
        text = f'{{"a":{{"dtype":"F32","shape":[2],"data_offsets":{field_text}}}}}'
    return _st(text, bytes(8))


# --- torch zip archives, edited ---------------------------------------------------------------


def _zip_members(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(info, zf.read(info)) for info in zf.infolist()]


def _rezip(members: list[tuple[str, bytes]], *, compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, payload in members:
            zf.writestr(zipfile.ZipInfo(name), payload, compress_type=compression)
    return buf.getvalue()


def _good_zip() -> bytes:
    return _torch_bytes(_weights())


def _deflated() -> bytes:
    return _rezip([(i.filename, d) for i, d in _zip_members(_good_zip())], compression=8)


def _duplicate_member() -> bytes:
    members = [(i.filename, d) for i, d in _zip_members(_good_zip())]
    data_member = next(m for m in members if "/data/" in m[0])
    with pytest.warns(UserWarning, match="Duplicate name"):
        return _rezip([*members, data_member])


def _two_data_pkl() -> bytes:
    members = [(i.filename, d) for i, d in _zip_members(_good_zip())]
    pkl = next(m for m in members if m[0].endswith("/data.pkl"))
    return _rezip([*members, ("other/data.pkl", pkl[1])])


def _no_data_pkl() -> bytes:
    return _rezip(
        [(i.filename, d) for i, d in _zip_members(_good_zip()) if "data.pkl" not in i.filename]
    )


def _bad_crc() -> bytes:
    """A tensor byte flipped, its CRC-32 left as it was."""
    data = bytearray(_good_zip())
    for info, payload in _zip_members(bytes(data)):
        if "/data/" in info.filename:
            offset = data.index(payload)
            data[offset] ^= 0xFF
            return bytes(data)
    raise AssertionError("no tensor member")


def _central_size(field_offset: int, value: int) -> bytes:
    """Every central-directory record's size field (20: compressed, 24: uncompressed) set."""
    data = bytearray(_good_zip())
    pos = data.find(b"PK\x01\x02")
    while pos != -1:
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        name = bytes(data[pos + 46 : pos + 46 + name_len])
        if b"/data/" in name:
            struct.pack_into("<I", data, pos + field_offset, value)
        pos = data.find(b"PK\x01\x02", pos + 4)
    return bytes(data)


# --- the corpus ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], Path]  # writes the source into the folder, returns its path
    xfail: str | None = None
    commands: tuple[str, ...] = ("inspect", "remap", "diff")
    message: str | None = None  # a substring the Error line must hold
    marks: tuple[Any, ...] = field(default=())


def _file(name: str, make: Callable[[], bytes]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        p = folder / name
        p.write_bytes(make())
        return p

    return build


def _pickle_case(payload: type[SystemCall], *, legacy: bool) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        p = folder / "evil.pth"
        obj = {**_weights(), "hook": payload(str(folder / MARKER))}
        p.write_bytes(_torch_bytes(obj, legacy=legacy))
        return p

    return build


def _torch_case(
    make: Callable[[], object], *, legacy: bool, cut: float = 1.0
) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        p = folder / "ckpt.pth"
        data = _torch_bytes(make(), legacy=legacy)
        p.write_bytes(data[: int(len(data) * cut)])
        return p

    return build


def _directory(folder: Path) -> Path:
    p = folder / "ckpt.pth"
    p.mkdir()
    (p / "junk").write_bytes(b"x")
    return p


def _fifo(folder: Path) -> Path:
    p = folder / "pipe.safetensors"
    os.mkfifo(p)
    return p


def _cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for fmt, legacy in (("zip", False), ("legacy", True)):
        for name, payload in PAYLOADS.items():
            cases[f"pickle-{name}-{fmt}"] = Case(
                _pickle_case(payload, legacy=legacy), message="refusing to unpickle"
            )
        torch_objects: dict[str, tuple[Callable[[], object], str | None]] = {
            "pickle-argparse.Namespace": (
                lambda: {**_weights(), "args": argparse.Namespace(lr=0.1)},
                "--allow-global argparse.Namespace",
            ),
            "pickle-Counter": (lambda: {**_weights(), "counts": collections.Counter(a=1)}, None),
            "int-keys": (lambda: {0: torch.ones(2), 1: torch.ones(3)}, None),
            "top-level-list": (lambda: [torch.ones(2)], None),
            "bare-tensor": (lambda: torch.ones(2), None),
        }
        for name, (make, message) in torch_objects.items():
            cases[f"{name}-{fmt}"] = Case(_torch_case(make, legacy=legacy), message=message)
        cases[f"truncated-half-{fmt}"] = Case(_torch_case(_weights, legacy=legacy, cut=0.5))
    cases["truncated-last-byte-zip"] = Case(_file("cut1.pth", lambda: _good_zip()[:-1]))

    # torch zip archives that torch itself would read, or read wrongly
    cases["zip-deflated-member"] = Case(_file("deflated.pth", _deflated), message="deflat")
    cases["zip-duplicate-member"] = Case(_file("dup.pth", _duplicate_member), message="two members")
    cases["zip-two-data.pkl"] = Case(_file("two.pth", _two_data_pkl), message="data.pkl")
    cases["zip-no-data.pkl"] = Case(_file("nopkl.pth", _no_data_pkl))
    # inspect and diff read data.pkl alone (and check its CRC): a damaged tensor record is
    # found by scan, which checks every member, and by whatever copies the record
    # (test_crc_mismatch_is_found_where_the_bytes_are_read)
    cases["zip-crc-mismatch"] = Case(
        _file("crc.pth", _bad_crc),
        message="'archive/data/0' fails its CRC-32",
        commands=("remap", "scan"),
    )
    cases["zip-declared-size-beyond-file"] = Case(
        _file("huge.pth", lambda: _central_size(24, 0x7FFFFFF0))
    )
    cases["zip-compressed-size-beyond-file"] = Case(
        _file("huge2.pth", lambda: _central_size(20, 0x7FFFFFF0))
    )

    # safetensors header defects
    st: dict[str, Callable[[], bytes]] = {
        "length-beyond-file": lambda: _st(GOOD_HEADER, GOOD_DATA, length=10_000),
        "length-over-100MB": lambda: _st(GOOD_HEADER, GOOD_DATA, length=100 * 1024 * 1024 + 1),
        "length-2**63": lambda: _st(GOOD_HEADER, GOOD_DATA, length=2**63),
        "not-utf8": lambda: _st(
            b'{"a\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8)
        ),
        "bom": lambda: _st(b"\xef\xbb\xbf" + json.dumps(GOOD_HEADER).encode(), GOOD_DATA),
        "not-json": lambda: _st("{this is not json", GOOD_DATA),
        "json-array": lambda: _st([1, 2, 3], GOOD_DATA),
        "json-string": lambda: _st('"hello"', GOOD_DATA),
        "duplicate-key": lambda: _st(
            '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
            '"a":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}',
            GOOD_DATA,
        ),
        "unknown-dtype": lambda: _st({"a": _t("F31", [2], 0, 8)}, bytes(8)),
        "span-mismatch": lambda: _st({"a": _t("F32", [3], 0, 8)}, bytes(8)),
        "gap": lambda: _st({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, bytes(12)),
        "overlap": lambda: _st({"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 4, 12)}, bytes(12)),
        "trailing-byte": lambda: _st(GOOD_HEADER, GOOD_DATA + b"\0"),
        "offsets-reversed": lambda: _st({"a": _t("F32", [0], 8, 0)}, bytes(8)),
        "offsets-beyond-file": lambda: _st({"a": _t("F32", [4], 0, 16)}, bytes(8)),
        "metadata-int-value": lambda: _st({"__metadata__": {"epoch": 3}, **GOOD_HEADER}, GOOD_DATA),
        "metadata-not-object": lambda: _st({"__metadata__": ["x"], **GOOD_HEADER}, GOOD_DATA),
        "tensor-spec-not-object": lambda: _st({"a": [1, 2]}, bytes(8)),
        "tensor-extra-field": lambda: _st({"a": {**_t("F32", [2], 0, 8), "x": 1}}, bytes(8)),
        "declared-2**60-elements": lambda: _st({"a": _t("F32", [2**60], 0, 8)}, bytes(8)),
        "declared-2**62-bytes": lambda: _st({"a": _t("U8", [2**31, 2**31], 0, 2**62)}, bytes(8)),
        "deeply-nested-json": lambda: _st("[" * 100_000 + "]" * 100_000, b""),
        "huge-integer": lambda: _st_raw_field("[" + "9" * 5000 + "]", where="shape"),
    }
    for what in ("shape", "offsets"):
        bad = {
            "float": "[2.0]" if what == "shape" else "[0, 8.0]",
            "bool": "[true]" if what == "shape" else "[false, 8]",
            "negative": "[-2]" if what == "shape" else "[-8, 0]",
            "NaN": "[NaN]" if what == "shape" else "[0, NaN]",
            "exponent": "[2e0]" if what == "shape" else "[0, 8e0]",
            "string": '["2"]' if what == "shape" else '["0", 8]',
            "null": "null",
        }
        for kind, text in bad.items():
            st[f"{what}-{kind}"] = lambda t=text, w=what: _st_raw_field(t, where=w)  # type: ignore[misc]
    for name, make in st.items():
        cases[f"safetensors-{name}"] = Case(_file(f"{name}.safetensors", make))
    cases["safetensors-truncated-half"] = Case(
        _file("cut.safetensors", lambda: _st(GOOD_HEADER, GOOD_DATA)[:30])
    )
    cases["safetensors-4-bytes"] = Case(_file("four.safetensors", lambda: b"\x10\0\0\0"))

    # not files at all, or empty ones
    cases["empty-pth"] = Case(_file("empty.pth", lambda: b""))
    cases["empty-safetensors"] = Case(_file("empty.safetensors", lambda: b""))
    cases["random-bytes"] = Case(_file("noise.bin", lambda: os.urandom(64) + b"\x80"))
    cases["directory"] = Case(_directory)
    cases["fifo"] = Case(_fifo)
    return cases


CASES = _cases()
PARAMS = [
    pytest.param(
        name,
        command,
        id=f"{name}-{command}",
        marks=[pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else [],
    )
    for name, case in CASES.items()
    for command in case.commands
]


def _fingerprint(p: Path) -> str:
    if p.is_fifo():
        return "fifo"
    if p.is_dir():
        return "dir:" + ",".join(sorted(f"{c.name}={_fingerprint(c)}" for c in p.iterdir()))
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _good_ref(folder: Path) -> Path:
    ref = folder / "ref.safetensors"
    ref.write_bytes(_st(GOOD_HEADER, GOOD_DATA))
    return ref


def _argv(command: str, src: Path, out: Path, ref: Path) -> list[str]:
    if command == "inspect":
        return ["inspect", str(src)]
    if command == "remap":
        return ["remap", str(src), "-o", str(out), "--force", "--strip-prefix", "x."]
    if command == "diff":
        return ["diff", str(src), "--against", str(ref)]
    if command == "scan":
        return ["scan", str(src)]
    raise AssertionError(command)


def _check_refused(stderr: str, exit_code: int, message: str | None) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert exit_code == 2, stderr
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    if message is not None:
        assert message in errors[0], errors[0]


@pytest.mark.parametrize(("name", "command"), PARAMS)
def test_hostile_source_is_refused(tmp_path: Path, name: str, command: str) -> None:
    case = CASES[name]
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ref = _good_ref(tmp_path)
    src = case.build(src_dir)
    before = _fingerprint(src)
    out = out_dir / "out.safetensors"

    result = cli_run(*_argv(command, src, out, ref))

    _check_refused(result.stderr, result.exit_code, case.message)
    assert not (src_dir / MARKER).exists(), "the pickle ran code"
    assert list(out_dir.iterdir()) == [], "something was written"
    assert _fingerprint(src) == before, "the input changed"
    assert sorted(p.name for p in src_dir.iterdir()) == [src.name]


def test_crc_mismatch_is_found_where_the_bytes_are_read(tmp_path: Path) -> None:
    """A tensor record that fails its CRC-32: inspect and diff read only data.pkl (whose
    CRC they check), so they succeed and stay fast on big files; scan checks every member,
    and remap, merge and apply check each record they copy: they refuse, and write nothing."""
    src = _file("crc.pth", _bad_crc)(tmp_path)
    ref = _good_ref(tmp_path)
    out = tmp_path / "out.safetensors"
    recipe = tmp_path / "recipes" / "r.toml"
    recipe.parent.mkdir()
    recipe.write_text(f'[[source]]\npath = "{src}"\n[output]\npath = "{out}"\n')
    before = _fingerprint(src)

    inspected = cli_run("inspect", src)
    assert inspected.exit_code == 0, inspected.stderr
    assert "Error:" not in inspected.stderr
    diffed = cli_run("diff", src, "--against", ref)
    assert diffed.exit_code in (0, 1), diffed.stderr  # w/b against a/b: a report, not an error
    assert "Error:" not in diffed.stderr

    for argv in (
        ["scan", str(src)],
        _argv("remap", src, out, ref),
        ["merge", str(src), str(ref), "-o", str(out), "--on-conflict", "first"],
        ["apply", str(recipe)],
    ):
        result = cli_run(*argv)
        _check_refused(result.stderr, result.exit_code, "'archive/data/0' fails its CRC-32")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crc.pth", "recipes", "ref.safetensors"]
    assert _fingerprint(src) == before


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("pickle-")])
def test_scan_shows_globals_without_running_them(tmp_path: Path, name: str) -> None:
    src = CASES[name].build(tmp_path)
    result = cli_run("scan", src, "--json")
    assert result.exit_code in (0, 1), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / MARKER).exists(), "scan ran the pickle"
    assert json.loads(result.stdout)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_subprocess_pickle_never_runs(tmp_path: Path, legacy: bool) -> None:
    """The same through a real process: its exit code and stderr, not CliRunner's."""
    src = _pickle_case(SystemCall, legacy=legacy)(tmp_path)
    out = tmp_path / "out.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "ckptsurgery", "remap", str(src), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    _check_refused(proc.stderr, proc.returncode, "refusing to unpickle")
    assert not (tmp_path / MARKER).exists()
    assert not out.exists()


# --- the top-level handler -------------------------------------------------------------------

RAISED: dict[str, tuple[BaseException, str]] = {
    "struct.error": (struct.error("unpack requires a buffer of 8 bytes"), "bug in ckptsurgery"),
    "EOFError": (EOFError("Ran out of input"), "bug in ckptsurgery"),
    "KeyError": (KeyError("storages"), "bug in ckptsurgery"),
    "ValueError": (ValueError("bad\nmultiline\nvalue"), "bug in ckptsurgery"),
    "UnicodeDecodeError": (
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        "bug in ckptsurgery",
    ),
    "RecursionError": (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
    "MemoryError": (MemoryError(), "out of memory"),
    "OSError": (OSError(5, "Input/output error", "/data/ckpt.pth"), "'/data/ckpt.pth'"),
    "PermissionError": (PermissionError(13, "Permission denied", "/x.pth"), "Permission denied"),
    "OSError-no-file": (OSError(28, "No space left on device"), "No space left on device"),
    "RuntimeError-empty": (RuntimeError(), "RuntimeError"),
}


def _raiser(exc: BaseException) -> Callable[..., Any]:
    def boom(*args: object, **kwargs: object) -> Any:
        raise exc

    return boom


@pytest.mark.parametrize("name", list(RAISED))
def test_any_exception_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    exc, expected = RAISED[name]
    monkeypatch.setattr("ckptsurgery.cli.inspect_cmd.open_source", _raiser(exc))
    result = cli_run("inspect", _good_ref(tmp_path))
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, result.stderr
    assert lines[0].startswith("Error: ")
    assert expected in result.stderr
    assert len(lines) <= 2  # the error and at most one hint
    assert sum(line.startswith("Error:") for line in lines) == 1
    assert "Traceback" not in result.stderr
    if "bug in ckptsurgery" in expected:
        assert "--debug" in lines[1]


def test_os_error_names_the_file_and_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "ckptsurgery.cli.inspect_cmd.open_source",
        _raiser(IsADirectoryError(21, "Is a directory", "/some/where")),
    )
    result = cli_run("inspect", _good_ref(tmp_path))
    assert result.stderr == "Error: '/some/where': Is a directory\n"


def test_debug_prints_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ckptsurgery.cli.inspect_cmd.open_source", _raiser(KeyError("storages")))
    result = cli_run("--debug", "inspect", _good_ref(tmp_path))
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert "KeyError: 'storages'" in result.stderr
    assert "Error: internal error: KeyError: 'storages'" in result.stderr
    # and the flag does not stick to the next run in the same process
    result = cli_run("inspect", _good_ref(tmp_path))
    assert "Traceback" not in result.stderr


def test_debug_with_a_checkpoint_error(tmp_path: Path) -> None:
    result = cli_run("--debug", "inspect", tmp_path / "missing.pth")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("Error: ")


def test_keyboard_interrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ckptsurgery.cli.inspect_cmd.open_source", _raiser(KeyboardInterrupt()))
    result = cli_run("inspect", _good_ref(tmp_path))
    assert result.exit_code == 130
    assert result.stderr == "Interrupted; nothing was written.\n"


def test_sigterm_is_handled_like_ctrl_c(tmp_path: Path) -> None:
    """A real process, caught inside a command (a ``--model`` factory that sleeps), SIGTERM'd."""
    factory = tmp_path / "sleepy_model.py"
    factory.write_text(
        "import time\n"
        "def build():\n"
        "    open(__file__ + '.started', 'w').close()\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    ref = _good_ref(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptsurgery", "diff", str(ref), "--model", "sleepy_model:build"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    started = Path(str(factory) + ".started")
    deadline = time.monotonic() + 60
    while not started.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "Interrupted; nothing was written."
    assert "Traceback" not in stderr
