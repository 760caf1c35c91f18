"""Hostile and broken input: refused with a specific error, never executed, never a hang."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import struct
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptsurgery as cs
from ckptsurgery.errors import (
    CheckpointError,
    FormatError,
    SourceError,
    UnsafePickleError,
)
from ckptsurgery.io.scan import scan_file
from ckptsurgery.io.torchfile import UnsafePickleWarning

LEGACY = [False, True]
LEGACY_IDS = ["zip", "legacy"]


class Touch:
    """Unpickling this creates a file: proof that the pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


def _save(obj: object, path: Path, *, legacy: bool) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _weights() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}


# --- pickles that need more than weights ----------------------------------------------------


@pytest.mark.parametrize("legacy", LEGACY, ids=LEGACY_IDS)
def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "MARKER"
    path = _save(
        {"state_dict": _weights(), "x": Touch(marker)}, tmp_path / "evil.pt", legacy=legacy
    )
    with pytest.raises(UnsafePickleError, match=r"refusing to unpickle .*builtins\.getattr") as e:
        cs.load_state_dict(path)
    message = str(e.value)
    assert "--unsafe-pickle" in message and "--allow-global" in message
    # Pickle protocol 2 spells Path.touch as getattr(PosixPath, "touch"): every global named.
    assert set(e.value.globals) >= {"builtins.getattr", "pathlib.PosixPath"}
    assert not marker.exists()
    with pytest.raises(UnsafePickleError):
        cs.open_checkpoint(path, allow_globals=["argparse.Namespace"])  # trusts something else
    assert not marker.exists()

    with pytest.warns(UnsafePickleWarning, match="unsafe-pickle"):
        sd = cs.load_state_dict(path, unsafe_pickle=True)
    assert marker.exists()
    assert sorted(sd) == ["b", "w"]


@pytest.mark.parametrize("legacy", LEGACY, ids=LEGACY_IDS)
def test_module_level_function_is_named(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.mkdir, (str(marker),))

    path = _save({"state_dict": _weights(), "x": Evil()}, tmp_path / "evil.pt", legacy=legacy)
    with pytest.raises(UnsafePickleError, match=r"refusing to unpickle posix\.mkdir\b") as e:
        cs.load_state_dict(path)
    assert "--allow-global posix.mkdir" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", LEGACY, ids=LEGACY_IDS)
def test_namespace_needs_allow_global(tmp_path: Path, legacy: bool) -> None:
    ckpt = {"args": argparse.Namespace(lr=0.1, arch="resnet"), "state_dict": _weights()}
    path = _save(ckpt, tmp_path / "ckpt.pth", legacy=legacy)
    with pytest.raises(
        UnsafePickleError,
        match=r"refusing to unpickle argparse\.Namespace \(.*--allow-global argparse\.Namespace"
        r".*--unsafe-pickle",
    ) as e:
        cs.load_state_dict(path)
    assert e.value.globals == ("argparse.Namespace",)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trusting one global is no unsafe load: no warning
        with cs.open_checkpoint(path, allow_globals=["argparse.Namespace"]) as c:
            assert c.key == "state_dict"
            assert c.other_entries == {"args": "argparse.Namespace"}
            assert sorted(c.state_dict()) == ["b", "w"]


def test_allow_global_that_cannot_be_imported(tmp_path: Path) -> None:
    path = _save(_weights(), tmp_path / "w.pt", legacy=False)
    with pytest.raises(SourceError, match=r"--allow-global 'no_such_module\.Thing': cannot import"):
        cs.load_state_dict(path, allow_globals=["no_such_module.Thing"])


def test_protocol_2_builtins_are_not_called_unsafe(tmp_path: Path) -> None:
    # torch.save's protocol 2 writes "__builtin__ set"; torch loads it as the safe builtins.set.
    path = _save({"state_dict": _weights(), "tags": {"a", "b"}}, tmp_path / "c.pt", legacy=True)
    fmt, refs = scan_file(path)
    assert fmt == "torch-legacy"
    assert {r.name: r.safe for r in refs}["builtins.set"] is True
    assert sorted(cs.load_state_dict(path)) == ["b", "w"]


def test_pickle_protocol_torch_cannot_read_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "p4.pt"
    torch.save(_weights(), path, pickle_protocol=4)
    with (
        warnings.catch_warnings(),
        pytest.raises(FormatError, match=r"opcode the weights-only unpickler.*--unsafe-pickle"),
    ):
        warnings.simplefilter("ignore")  # torch's own note about protocol 4
        cs.load_state_dict(path)


# --- truncated and corrupt torch files ------------------------------------------------------


@pytest.mark.parametrize("cut", ["half", "last10"])
def test_truncated_zip(tmp_path: Path, cut: str) -> None:
    data = _save({"state_dict": _weights()}, tmp_path / "full.pt", legacy=False).read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2] if cut == "half" else data[:-10])
    with pytest.raises(FormatError, match="truncated or malformed torch zip archive"):
        cs.load_state_dict(path)


def test_truncated_legacy_at_every_length(tmp_path: Path) -> None:
    # Not one cut may escape as a raw struct.error / AssertionError, or pass for an unsafe file.
    data = _save({"state_dict": _weights()}, tmp_path / "full.pt", legacy=True).read_bytes()
    path = tmp_path / "cut.pt"
    for n in range(1, len(data), 7):
        path.write_bytes(data[:n])
        with pytest.raises(FormatError) as e:
            cs.load_state_dict(path)
        assert not isinstance(e.value, UnsafePickleError), n


def _fix_crc(data: bytearray, member: str) -> None:
    """Recompute a member's CRC-32 in the central directory, as a careful forger would."""
    import zipfile
    import zlib

    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo(member)
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    begin = info.header_offset + 30 + name_len + extra_len
    crc = zlib.crc32(data[begin : begin + info.file_size])
    central = data.index(b"PK\x01\x02")  # the central directory: one entry per member
    while data[central + 46 : central + 46 + len(member)] != member.encode():
        central = data.index(b"PK\x01\x02", central + 4)
    data[central + 16 : central + 20] = struct.pack("<I", crc)


def test_corrupt_pickle_in_zip_is_malformed_not_unsafe(tmp_path: Path) -> None:
    path = _save(_weights(), tmp_path / "c.pt", legacy=False)
    data = bytearray(path.read_bytes())
    at = data.index(b"data.pkl") + len(b"data.pkl")
    start = data.index(b"\x80\x02", at)  # the pickle (stored uncompressed) starts here
    data[start + 2] = 0xEE  # not an opcode at all
    _fix_crc(data, "c/data.pkl")  # else the CRC check refuses it before any unpickling
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="corrupt or uses an opcode") as e:
        cs.load_state_dict(path)
    assert not isinstance(e.value, UnsafePickleError)


@pytest.mark.parametrize("member", ["data.pkl", "data/0"])
def test_corrupt_member_fails_its_crc(tmp_path: Path, member: str) -> None:
    path = _save(_weights(), tmp_path / "c.pt", legacy=False)
    data = bytearray(path.read_bytes())
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"c/{member}")
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    data[info.header_offset + 30 + name_len + extra_len + 3] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(data))
    for fmt in ("safetensors", "pt"):
        with pytest.raises(FormatError, match=rf"'c/{member}' fails its CRC-32 check.*corrupt"):
            cs.remap(path, tmp_path / f"out.{fmt}", cs.Rules())
        assert not (tmp_path / f"out.{fmt}").exists()


def test_zip_that_is_not_a_torch_file(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(FormatError, match=r"exactly one data\.pkl, this one 0"):
        cs.load_state_dict(path)


def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, but such files are about
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(FormatError, match=r"TorchScript archive .*torch\.jit\.load"):
        cs.load_state_dict(path)


# --- broken safetensors ---------------------------------------------------------------------


def _entry(dtype: str, shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


F32 = _entry("F32", [2], 0, 8)
BAD_HEADERS: list[tuple[str, bytes | dict[str, Any], bytes, str]] = [
    ("not_json", b"{not json}", b"", r"the header is not JSON \(Expecting property name"),
    (
        "duplicate_name",
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
        bytes(8),
        "the header names 'a' twice",
    ),
    (
        "float_in_shape",
        {"a": _entry("F32", [2.0], 0, 8)},
        bytes(8),
        "tensor 'a': shape must be a list of non-negative integers",
    ),
    (
        "negative_shape",
        {"a": _entry("F32", [-1], 0, 4)},
        bytes(4),
        "tensor 'a': shape must be a list of non-negative integers",
    ),
    (
        "nan_in_shape",
        b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}',
        bytes(4),
        "the header holds NaN, which JSON does not allow",
    ),
    (
        "float_offsets",
        {"a": _entry("F32", [2], 0.0, 8)},
        bytes(8),
        "tensor 'a': data_offsets must be two integers",
    ),
    (
        "overlap",
        {"a": F32, "b": _entry("F32", [1], 4, 8)},
        bytes(8),
        "tensor 'b' overlaps the previous tensor",
    ),
    (
        "gap",
        {"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 8, 12)},
        bytes(12),
        "tensor 'b' leaves a gap",
    ),
    ("trailing", {"a": F32}, bytes(10), "2 bytes after the last tensor's data"),
    ("unknown_dtype", {"a": _entry("F31", [2], 0, 8)}, bytes(8), "tensor 'a': unknown dtype 'F31'"),
    (
        "size_mismatch",
        {"a": _entry("F32", [3], 0, 8)},
        bytes(8),
        r"shape \[3\] of F32 needs 12 bytes but data_offsets span 8",
    ),
    (
        "bom",
        b"\xef\xbb\xbf" + json.dumps({"a": F32}).encode(),
        bytes(8),
        "the header starts with a UTF-8 byte-order mark",
    ),
    ("not_utf8", b'{"\xff":1}', b"", "the header is not UTF-8"),
    (
        "not_an_object_spec",
        {"a": 5},
        b"",
        "tensor 'a': expected exactly dtype, shape and data_offsets",
    ),
    (
        "metadata_not_str",
        {"__metadata__": {"k": 1}},
        b"",
        "__metadata__ must map strings to strings",
    ),
    (
        "deeply_nested",
        b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b"",
        r"the header cannot be parsed \(RecursionError",
    ),
    (
        "aliases_not_stored",
        {"__metadata__": {"ckptsurgery.aliases": '{"b":"zz"}'}, "a": F32},
        bytes(8),
        "metadata 'ckptsurgery.aliases' does not name stored tensors",
    ),
]


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [case[1:] for case in BAD_HEADERS],
    ids=[case[0] for case in BAD_HEADERS],
)
def test_malformed_safetensors(tmp_path: Path, header: Any, data: bytes, message: str) -> None:
    path = write_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(FormatError, match=message):
        cs.load_state_dict(path)


def test_header_length_beyond_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b'{"a":1}')
    with pytest.raises(FormatError, match="the header claims 1000 bytes but the file has only 7"):
        cs.load_state_dict(path)
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(FormatError, match="over the 100000000-byte limit"):
        cs.load_state_dict(path)


@pytest.mark.parametrize("where", ["data", "header"])
def test_truncated_safetensors(tmp_path: Path, where: str) -> None:
    full = tmp_path / "full.safetensors"
    cs.save_state_dict(_weights(), full)
    data = full.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:-5] if where == "data" else data[: 8 + n // 2])
    message = r"its data ends at byte \d+ of a \d+-byte data section \(truncated file\?\)"
    if where == "header":
        message = r"the header claims \d+ bytes but the file has only \d+ .*\(truncated\?\)"
    with pytest.raises(FormatError, match=message):
        cs.load_state_dict(path)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cut=st.integers(min_value=0),
    flips=st.lists(st.tuples(st.integers(0), st.integers(0, 255)), max_size=3),
)
def test_damaged_safetensors_never_escapes(
    tmp_path: Path, cut: int, flips: list[tuple[int, int]]
) -> None:
    full = tmp_path / "full.safetensors"
    if not full.exists():
        cs.save_state_dict(_weights(), full)
    data = bytearray(full.read_bytes())
    for at, value in flips:
        data[at % len(data)] = value
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(bytes(data[: len(data) - cut % len(data)] if cut else data))
    # Any failure must be one of ours, with a message, never a raw exception.
    with contextlib.suppress(CheckpointError):
        cs.load_state_dict(path)


# --- things that are not checkpoints at all ------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(FormatError, match="is empty"):
        cs.load_state_dict(path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(bytes(range(7, 256)) * 4)
    with pytest.raises(FormatError, match="is not a recognised checkpoint"):
        cs.load_state_dict(path)


def test_plain_pickle(tmp_path: Path) -> None:
    import pickle

    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(FormatError, match="not a torch checkpoint"):
        cs.load_state_dict(path)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="is a directory"):
        cs.load_state_dict(tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        cs.load_state_dict(tmp_path / "nope.pt")


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    import threading

    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came along
    caught: list[BaseException] = []

    def load() -> None:
        try:
            cs.load_state_dict(fifo)
        except BaseException as e:
            caught.append(e)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "reading a FIFO blocked"
    assert len(caught) == 1 and isinstance(caught[0], SourceError)
    assert "is not a regular file" in str(caught[0])
