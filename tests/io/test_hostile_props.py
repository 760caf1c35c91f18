"""Mutated checkpoints: read correctly or refused with a CheckpointError, never anything else.

Valid safetensors files and torch archives are damaged by hypothesis (bytes flipped,
inserted or cut; header JSON fields replaced by arbitrary JSON; bytes of ``data.pkl`` flipped
with and without a matching CRC-32). :func:`ckptsurgery.open_checkpoint` must then either
open the file, and every tensor must then read, or raise a :class:`CheckpointError`. A
SIGALRM guard turns a hang into a failure instead of a stuck suite.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import signal
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptsurgery as cs
from ckptsurgery.errors import CheckpointError

FAST = settings(
    max_examples=60,
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HANG_LIMIT_S = 20


class Hung(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tied = torch.randn(3, 2, generator=g)
    return {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.arange(4, dtype=torch.int64),
        "h": torch.tensor([1.0, -0.0], dtype=torch.float16),
        "t.a": tied,
        "t.b": tied,
    }


def _read_or_refuse(path: Path) -> None:
    """The property: open and read every tensor, or a CheckpointError; nothing else."""
    with _time_limit(HANG_LIMIT_S):
        try:
            ckpt = cs.open_checkpoint(path)
        except CheckpointError as e:
            assert str(e), "an error without a message"
            return
        with ckpt:
            try:
                for name, info in ckpt.infos.items():
                    t = ckpt.tensor(ckpt.canonical(name))
                    assert tuple(t.shape) == tuple(info.shape), name
                    assert str(t.dtype).removeprefix("torch.") == str(info.dtype), name
            except CheckpointError as e:
                # Damage found while reading the tensors (a CRC) is fine too: it is ours.
                assert str(e)


@functools.cache
def _valid() -> dict[str, bytes]:
    """The undamaged files, built once (a plain function: hypothesis would print a fixture)."""
    with tempfile.TemporaryDirectory() as folder:
        st_path = Path(folder) / "ok.safetensors"
        cs.save_state_dict({k: v for k, v in _weights().items() if k != "t.b"}, st_path)
        safetensors = st_path.read_bytes()
    buf = io.BytesIO()
    torch.save(_weights(), buf)
    legacy = io.BytesIO()
    torch.save(_weights(), legacy, _use_new_zipfile_serialization=False)
    return {"safetensors": safetensors, "zip": buf.getvalue(), "legacy": legacy.getvalue()}


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# --- safetensors --------------------------------------------------------------------------


def _header(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _assemble(header: Any, rest: bytes) -> bytes:
    raw = json.dumps(header).encode()  # NaN and Infinity come out as JSON does not allow
    return struct.pack("<Q", len(raw)) + raw + rest


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
plausible_ints = st.integers(min_value=-2, max_value=2**64 + 1) | st.sampled_from(
    [0, 1, 4, 8, 12, 16, 48, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
)
fields = st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "new", "drop"])


@FAST
@given(
    flips=st.lists(st.tuples(st.integers(0), st.integers(1, 255)), min_size=1, max_size=4),
    header_only=st.booleans(),
)
def test_safetensors_bytes_flipped(
    tmp_path: Path, flips: list[tuple[int, int]], header_only: bool
) -> None:
    data = bytearray(_valid()["safetensors"])
    (n,) = struct.unpack("<Q", data[:8])
    span = 8 + n if header_only else len(data)
    for at, xor in flips:
        data[at % span] ^= xor
    _read_or_refuse(_write(tmp_path, "m.safetensors", bytes(data)))


@FAST
@given(cut=st.integers(0), at=st.integers(0), inserted=st.binary(min_size=1, max_size=8))
def test_safetensors_truncated_or_grown(tmp_path: Path, cut: int, at: int, inserted: bytes) -> None:
    data = _valid()["safetensors"]
    _read_or_refuse(_write(tmp_path, "cut.safetensors", data[: cut % len(data)]))
    at %= len(data) + 1
    _read_or_refuse(_write(tmp_path, "ins.safetensors", data[:at] + inserted + data[at:]))


@FAST
@given(
    tensor=st.integers(0),
    field=fields,
    value=json_values | st.lists(plausible_ints, max_size=3) | plausible_ints,
)
def test_safetensors_header_field_replaced(
    tmp_path: Path, tensor: int, field: str, value: Any
) -> None:
    header, rest = _header(_valid()["safetensors"])
    names = [k for k in header if k != "__metadata__"]
    name = names[tensor % len(names)]
    if field == "__metadata__":
        header["__metadata__"] = value
    elif field == "new":
        header[f"new{tensor}"] = value
    elif field == "drop":
        del header[name]
    else:
        header[name][field] = value
    _read_or_refuse(_write(tmp_path, "f.safetensors", _assemble(header, rest)))


@pytest.mark.parametrize("dtype", [[], ["F32"], {}], ids=["empty-list", "list", "object"])
def test_unhashable_dtype(tmp_path: Path, dtype: Any) -> None:
    """Found by test_safetensors_header_field_replaced (field='dtype', value=[])."""
    header, rest = _header(_valid()["safetensors"])
    header["w"]["dtype"] = dtype
    path = _write(tmp_path, "d.safetensors", _assemble(header, rest))
    with pytest.raises(CheckpointError, match="tensor 'w': dtype must be a string"):
        cs.open_checkpoint(path)


@FAST
@given(tensor=st.integers(0), begin=plausible_ints, end=plausible_ints)
def test_safetensors_offsets_replaced(tmp_path: Path, tensor: int, begin: int, end: int) -> None:
    header, rest = _header(_valid()["safetensors"])
    names = [k for k in header if k != "__metadata__"]
    header[names[tensor % len(names)]]["data_offsets"] = [begin, end]
    _read_or_refuse(_write(tmp_path, "o.safetensors", _assemble(header, rest)))


# --- torch archives -----------------------------------------------------------------------


def _member_span(data: bytes, suffix: str) -> tuple[int, int, int, int]:
    """(data offset, size, local header offset, central record offset) of a stored member."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    local = info.header_offset
    name_len, extra_len = struct.unpack_from("<HH", data, local + 26)
    start = local + 30 + name_len + extra_len
    central = data.index(b"PK\x01\x02")
    while data[central + 46 : central + 46 + name_len] != info.filename.encode():
        central = data.index(b"PK\x01\x02", central + 4)
    return start, info.file_size, local, central


def _fix_crc(data: bytearray, suffix: str) -> None:
    start, size, local, central = _member_span(bytes(data), suffix)
    crc = zlib.crc32(bytes(data[start : start + size]))
    struct.pack_into("<I", data, local + 14, crc)
    struct.pack_into("<I", data, central + 16, crc)


@FAST
@given(
    flips=st.lists(st.tuples(st.integers(0), st.integers(1, 255)), min_size=1, max_size=3),
    fix_crc=st.booleans(),
)
def test_zip_data_pkl_bytes_flipped(
    tmp_path: Path, flips: list[tuple[int, int]], fix_crc: bool
) -> None:
    data = bytearray(_valid()["zip"])
    start, size, _, _ = _member_span(_valid()["zip"], "/data.pkl")
    for at, xor in flips:
        data[start + at % size] ^= xor
    if fix_crc:  # past the CRC check, so the pickle reader itself meets the damage
        _fix_crc(data, "/data.pkl")
    _read_or_refuse(_write(tmp_path, "p.pth", bytes(data)))


@FAST
@given(flips=st.lists(st.tuples(st.integers(0), st.integers(1, 255)), min_size=1, max_size=3))
def test_zip_any_bytes_flipped(tmp_path: Path, flips: list[tuple[int, int]]) -> None:
    data = bytearray(_valid()["zip"])
    for at, xor in flips:
        data[at % len(data)] ^= xor
    _read_or_refuse(_write(tmp_path, "z.pth", bytes(data)))


@FAST
@given(cut=st.integers(1))
def test_zip_truncated(tmp_path: Path, cut: int) -> None:
    data = _valid()["zip"]
    _read_or_refuse(_write(tmp_path, "t.pth", data[: len(data) - cut % len(data)]))


@FAST
@given(
    flips=st.lists(st.tuples(st.integers(0), st.integers(1, 255)), min_size=1, max_size=3),
    cut=st.integers(0),
)
def test_legacy_bytes_flipped_or_truncated(
    tmp_path: Path, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(_valid()["legacy"])
    for at, xor in flips:
        data[at % len(data)] ^= xor
    _read_or_refuse(_write(tmp_path, "l.pth", bytes(data[: len(data) - cut % len(data)])))
