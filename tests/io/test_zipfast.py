"""torch zip archives read and written without torch: the pickle through stand-ins, tensor
bytes straight from (and to) the storage records."""

from __future__ import annotations

import argparse
import io
import json
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import assert_bit_exact, assert_tied, raw, run_without_torch, sample_state_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptsurgery as cs
from ckptsurgery.describe import describe
from ckptsurgery.errors import CheckpointError, FormatError
from ckptsurgery.io.torchfile import TorchCheckpoint
from ckptsurgery.io.torchpickle import Unsupported, load_refs
from ckptsurgery.io.torchzip import TorchZipCheckpoint, write_torch_zip


def _records(path: Path) -> dict[str, tuple[bytes, int]]:
    """Storage records by name: (bytes, CRC-32 from the directory)."""
    with zipfile.ZipFile(path) as zf:
        return {
            i.filename.split("/", 1)[1]: (zf.read(i), i.CRC)
            for i in zf.infolist()
            if "/data/" in i.filename
        }


def _model_and_optimizer() -> dict[str, object]:
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    return {
        "epoch": 3,
        "arch": "tiny",
        "model": m.state_dict(),
        "optimizer": opt.state_dict(),
        "tags": {"a", "b"},
        "blob": b"xyz",
        "c": 1 + 2j,
        "none": None,
        "params": dict(m.named_parameters()),
    }


CASES = {
    "sample": lambda: sample_state_dict(),
    "nested": lambda: {"epoch": 1, "state_dict": sample_state_dict()},
    "training": _model_and_optimizer,
    "ordered": lambda: OrderedDict(w=torch.ones(2), b=torch.zeros(3, dtype=torch.bfloat16)),
    "odd dtypes": lambda: {
        "u16": torch.arange(5).to(torch.uint16),
        "u32": torch.arange(5).to(torch.uint32),
        "u64": torch.arange(5).to(torch.uint64),
        "c128": torch.randn(3, dtype=torch.complex128),
        "e8m0": torch.ones(3).to(torch.float8_e8m0fnu),
        "fnuz": torch.ones(3).to(torch.float8_e4m3fnuz),
        "empty": torch.zeros(0, 5),
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_stand_ins_describe_what_torch_loads(tmp_path: Path, case: str) -> None:
    path = tmp_path / "c.pt"
    obj = CASES[case]()
    torch.save(obj, path)
    key = "params" if case == "training" else None
    fast = TorchZipCheckpoint(path, key=key)
    slow = TorchCheckpoint(path, "torch-zip", key=key, allow_globals=(), unsafe_pickle=False)
    with fast, slow:
        assert describe(fast) == describe(slow)
        assert fast.aliases == slow.aliases
        assert_bit_exact(fast.state_dict(), slow.state_dict())
        for name in fast.infos:
            assert bytes(fast.raw_bytes(name)) == bytes(slow.raw_bytes(name)), name


def test_open_checkpoint_takes_the_fast_path(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"epoch": 1, "state_dict": sample_state_dict()}, path)
    with cs.open_checkpoint(path) as ckpt:
        assert type(ckpt) is TorchZipCheckpoint
        assert ckpt.key == "state_dict"
        got = ckpt.state_dict()
    assert_bit_exact(got, sample_state_dict())
    assert_tied(got, "tied.a", "tied.b")


def test_what_the_stand_ins_do_not_know_goes_through_torch(tmp_path: Path) -> None:
    path = tmp_path / "ns.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": {"w": torch.ones(2)}}, path)
    with zipfile.ZipFile(path) as zf:
        data = zf.read("ns/data.pkl")
    with pytest.raises(Unsupported, match=r"global argparse\.Namespace"):
        load_refs(data)
    with cs.open_checkpoint(path, allow_globals=["argparse.Namespace"]) as ckpt:
        assert type(ckpt) is TorchCheckpoint
        assert ckpt.other_entries == {"args": "argparse.Namespace"}


@pytest.mark.parametrize(
    "pickle_bytes",
    [
        b"\x80\x04K\x01.",  # protocol 4: torch's weights-only reader decides
        b"\x80\x02cos\nsystem\n.",  # a global outside the vocabulary
        b"\x80\x02(X\x03\x00\x00\x00fooQ.",  # a persistent id that is not a storage
        b"\x80\x02\x8e",  # truncated
    ],
)
def test_stand_ins_refuse_beyond_their_vocabulary(pickle_bytes: bytes) -> None:
    with pytest.raises(Unsupported):
        load_refs(pickle_bytes)


# --- writing --------------------------------------------------------------------------------


@pytest.mark.parametrize("src_fmt", ["torch", "safetensors"])
def test_written_archive_loads_with_torch_weights_only(tmp_path: Path, src_fmt: str) -> None:
    sd = sample_state_dict()
    src = tmp_path / ("src.pt" if src_fmt == "torch" else "src.safetensors")
    torch.save(sd, src) if src_fmt == "torch" else cs.save_state_dict(sd, src)
    out = tmp_path / "out.pt"
    cs.remap(src, out, cs.Rules(add_prefix="x."))
    want = {f"x.{n}": t for n, t in sd.items()}
    plain = torch.load(out, weights_only=True)
    assert type(plain) is dict
    assert_bit_exact(plain, want)
    assert_tied(plain, "x.tied.a", "x.tied.b")
    for name, t in plain.items():  # every tensor owns its storage
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None  # every CRC-32 right
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            if "/data/" in info.filename:  # 64-byte aligned, as torch aligns them
                name_len, extra_len = struct.unpack(
                    "<HH", out.read_bytes()[info.header_offset + 26 : info.header_offset + 30]
                )
                assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0


def test_torch_to_torch_copies_whole_records_unchanged(tmp_path: Path) -> None:
    sd = {f"module.layer{i}.weight": torch.randn(64, 32) for i in range(5)}
    sd["module.tied"] = sd["module.layer0.weight"]
    src, out = tmp_path / "src.pt", tmp_path / "out.pt"
    torch.save(sd, src)
    cs.remap(src, out, cs.Rules(strip_prefix=["module."], drop=["*layer3*"]))
    before, after = _records(src), _records(out)
    kept = [before[f"data/{k}"] for k in ("0", "1", "2", "4")]
    assert list(after.values()) == kept  # bytes and CRCs, in order
    assert_bit_exact(
        torch.load(out, weights_only=True),
        {k.removeprefix("module."): v for k, v in sd.items() if "layer3" not in k},
    )


def test_views_of_one_storage(tmp_path: Path) -> None:
    big = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    sd = {"slice": big[2:5], "column": big[:, 1], "t": big.t(), "whole": big, "scalar": big[3, 2]}
    src = tmp_path / "v.pt"
    torch.save(sd, src)
    for ext in ("pt", "safetensors"):
        out = tmp_path / f"out.{ext}"
        cs.remap(src, out, cs.Rules(drop=["whole"]))
        back = cs.load_state_dict(out)
        assert_bit_exact(back, {n: t for n, t in sd.items() if n != "whole"})
        if ext == "pt":  # a slice of a big storage is written alone
            for t in torch.load(out, weights_only=True).values():
                assert t.untyped_storage().nbytes() == t.numel() * 4


@pytest.mark.parametrize("src_fmt", ["torch", "safetensors"])
def test_zip64_archive_loads(tmp_path: Path, src_fmt: str) -> None:
    sd = sample_state_dict()
    src = tmp_path / ("src.pt" if src_fmt == "torch" else "src.safetensors")
    torch.save(sd, src) if src_fmt == "torch" else cs.save_state_dict(sd, src)
    out = tmp_path / "z64.pt"
    with cs.open_checkpoint(src) as ckpt, open(out, "wb") as f:
        write_torch_zip(f, ckpt, [(n, n) for n in ckpt.infos], force_zip64=True)
    data = out.read_bytes()
    assert b"PK\x06\x06" in data and b"PK\x06\x07" in data  # zip64 end records
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None
    assert_bit_exact(torch.load(out, weights_only=True), sd)
    assert_bit_exact(torch.load(out, weights_only=True, mmap=True), sd)
    assert_bit_exact(cs.load_state_dict(out), sd)


@pytest.mark.skipif(
    "CKPTSURGERY_BIG_TESTS" not in __import__("os").environ,
    reason="writes 9 GB; set CKPTSURGERY_BIG_TESTS=1 to run",
)
def test_real_zip64_over_4gb(tmp_path: Path) -> None:
    """A 4.5 GB tensor: a record and offsets past 4 GiB, read and written without torch."""
    src = tmp_path / "big.safetensors"
    n = 4_500_000_000
    from ckptsurgery.io.dtypes import TensorInfo
    from ckptsurgery.io.safetensors_format import encode_header

    header, _ = encode_header(
        [("big", TensorInfo((n,), "uint8", n)), ("after", TensorInfo((4,), "uint8", 4))], {}
    )
    with open(src, "wb") as f:
        f.write(header)
        f.truncate(len(header) + n)
        f.seek(0, 2)
        f.write(b"\x01\x02\x03\x04")
    out = tmp_path / "big.pt"
    cs.remap(src, out, cs.Rules())
    with cs.open_checkpoint(out) as ckpt:
        assert type(ckpt) is TorchZipCheckpoint
        assert bytes(ckpt.raw_bytes("after")) == b"\x01\x02\x03\x04"
    back = tmp_path / "back.safetensors"
    cs.remap(out, back, cs.Rules())
    with cs.open_checkpoint(back) as ckpt:
        assert bytes(ckpt.raw_bytes("after")) == b"\x01\x02\x03\x04"
    t = torch.load(out, weights_only=True, mmap=True)
    assert raw(t["after"]) == b"\x01\x02\x03\x04" and t["big"].numel() == n


# --- no torch on these paths ----------------------------------------------------------------


def test_inspect_and_convert_a_torch_zip_without_torch(tmp_path: Path) -> None:
    sd = sample_state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{n}": t for n, t in sd.items()}},
               tmp_path / "m.pth.tar")  # fmt: skip
    proc = run_without_torch(
        """
        cli("inspect", "m.pth.tar", "--json")
        cli("remap", "m.pth.tar", "-o", "out.safetensors", "--strip-prefix", "module.")
        cli("remap", "m.pth.tar", "-o", "out.pt", "--strip-prefix", "module.", "--drop", "*int8")
        cli("remap", "m.pth.tar", "-o", "shards", "--strip-prefix", "module.",
            "--max-shard-size", "100")
        """,
        tmp_path,
    )
    report = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    assert report["key"] == "state_dict" and report["other_entries"] == {"epoch": "int"}
    assert [t["key"] for t in report["tensors"]] == [f"module.{n}" for n in sd]
    assert_bit_exact(cs.load_state_dict(tmp_path / "out.safetensors"), sd)
    assert_bit_exact(cs.load_state_dict(tmp_path / "shards"), sd)
    plain = torch.load(tmp_path / "out.pt", weights_only=True)
    assert_bit_exact(plain, {n: t for n, t in sd.items() if n != "int8"})
    ref = safetensors.torch.load_file(tmp_path / "out.safetensors")
    assert_bit_exact(ref, {n: t for n, t in sd.items() if n != "tied.b"}, ordered=False)


# --- damaged archives ---------------------------------------------------------------------


def _stored_zip(path: Path, members: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _members(sd: dict[str, torch.Tensor]) -> dict[str, bytes]:
    buf = io.BytesIO()
    torch.save(sd, buf)
    with zipfile.ZipFile(buf) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def test_compressed_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deflated.pt"
    _stored_zip(path, _members({"w": torch.zeros(1000)}), zipfile.ZIP_DEFLATED)
    with pytest.raises(FormatError, match=r"is compressed; .*zip bomb"):
        cs.open_checkpoint(path)


def test_duplicate_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.pt"
    members = _members({"w": torch.zeros(4)})
    _stored_zip(path, members)
    with zipfile.ZipFile(path, "a") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("archive/data/0", b"\x00" * 16)
    with pytest.raises(FormatError, match=r"two members named 'archive/data/0'"):
        cs.open_checkpoint(path)


def test_record_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.pt"
    members = _members({"w": torch.zeros(4)})
    members["archive/data/0"] = members["archive/data/0"][:8]
    _stored_zip(path, members)
    with pytest.raises(FormatError, match=r"holds 8 bytes but the pickle declares 16"):
        cs.open_checkpoint(path)


def test_missing_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "missing.pt"
    members = _members({"w": torch.zeros(4)})
    del members["archive/data/0"]
    _stored_zip(path, members)
    with pytest.raises(FormatError, match=r"storage '0', which has no record"):
        cs.open_checkpoint(path)


_SMALL = _members({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)})


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_archives_read_or_refuse(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "m.pt"
    _stored_zip(path, _SMALL)
    blob = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    path.write_bytes(bytes(blob))
    try:
        with cs.open_checkpoint(path) as ckpt:
            for name in ckpt.infos:
                ckpt.raw_bytes(name)
    except CheckpointError:
        pass
