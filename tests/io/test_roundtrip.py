"""Bit-exact round trips through save/load and remap, and formats recognised from content."""

from __future__ import annotations

import json
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import (
    assert_bit_exact,
    assert_tied,
    raw,
    safetensors_header,
    sample_state_dict,
)

import ckptsurgery as cs
from ckptsurgery.io import SAFETENSORS, TORCH_LEGACY, TORCH_ZIP, detect_format
from ckptsurgery.io.safetensors_format import ALIASES_KEY

EXT = {"safetensors": ".safetensors", "torch": ".pt"}


def _storage_records(path: Path) -> list[str]:
    """The storages a torch zip holds (one ``<archive>/data/<n>`` record each)."""
    with zipfile.ZipFile(path) as zf:
        return [n for n in zf.namelist() if n.split("/")[-2:-1] == ["data"]]


def _check_output(path: Path, fmt: str, want: dict[str, torch.Tensor]) -> None:
    """What a user loading OUT without ckptsurgery sees, and what ckptsurgery reads back."""
    back = cs.load_state_dict(path)
    assert_bit_exact(back, want)
    assert_tied(back, "tied.a", "tied.b")
    if fmt == "torch":
        plain = torch.load(path, weights_only=True)
        assert type(plain) is dict
        assert all(isinstance(v, torch.Tensor) for v in plain.values())
        assert_bit_exact(plain, want)
        assert_tied(plain, "tied.a", "tied.b")
        # No tensor drags a bigger storage along (the slice views of a 40-float tensor).
        for name, t in plain.items():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
        # The tied pair is one storage in the archive; every other name has its own.
        assert len(_storage_records(path)) == len(want) - 1
    else:
        header = safetensors_header(path)
        meta = header.pop("__metadata__")
        stored = [n for n in want if n != "tied.b"]
        assert sorted(header) == sorted(stored)
        assert json.loads(meta[ALIASES_KEY]) == {"tied.b": "tied.a"}
        ref = safetensors.torch.load_file(path)
        assert_bit_exact(ref, {n: want[n] for n in stored}, ordered=False)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_save_load_round_trip(tmp_path: Path, fmt: str) -> None:
    sd = sample_state_dict()
    before = {n: raw(t) for n, t in sd.items()}
    out = tmp_path / f"out{EXT[fmt]}"
    result = cs.save_state_dict(sd, out)
    assert result.format == fmt
    assert (result.tensors, result.stored) == (len(sd), len(sd) - 1)
    assert result.bytes == out.stat().st_size
    _check_output(out, fmt, sd)
    # The caller's tensors are untouched.
    assert {n: raw(t) for n, t in sd.items()} == before


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_format_argument_overrides_extension(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "weights.data"
    assert cs.save_state_dict(sample_state_dict(), out, format=fmt).format == fmt
    assert detect_format(out) == (SAFETENSORS if fmt == "safetensors" else TORCH_ZIP)


@pytest.mark.parametrize("src_fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_remap_round_trip(tmp_path: Path, src_fmt: str, fmt: str) -> None:
    sd = sample_state_dict()
    src = tmp_path / f"src{EXT[src_fmt]}"
    if src_fmt == "torch":
        torch.save(sd, src)  # written by torch itself: views share the 40-float storage
    else:
        cs.save_state_dict(sd, src)
    src_bytes = src.read_bytes()
    out = tmp_path / f"out{EXT[fmt]}"
    result = cs.remap(src, out, cs.Rules(add_prefix="m."))
    assert result.written is not None and result.written.format == fmt
    want = {f"m.{n}": t for n, t in sd.items()}
    back = cs.load_state_dict(out)
    assert_bit_exact(back, want)
    assert_tied(back, "m.tied.a", "m.tied.b")
    assert src.read_bytes() == src_bytes
    if fmt == "torch":
        plain = torch.load(out, weights_only=True)
        assert type(plain) is dict
        assert_bit_exact(plain, want)
        for name, t in plain.items():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
        assert len(_storage_records(out)) == len(want) - 1
    else:
        header = safetensors_header(out)
        meta = header.pop("__metadata__")
        assert "m.tied.b" not in header and "m.tied.a" in header
        assert json.loads(meta[ALIASES_KEY]) == {"m.tied.b": "m.tied.a"}
        ref = safetensors.torch.load_file(out)
        assert_bit_exact(ref, {n: t for n, t in want.items() if n != "m.tied.b"}, ordered=False)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_remap_keeps_alias_when_its_storing_name_is_dropped(tmp_path: Path, fmt: str) -> None:
    sd = sample_state_dict()
    src = tmp_path / "src.safetensors"
    cs.save_state_dict(sd, src)  # stores tied.a, records tied.b as its alias
    out = tmp_path / f"out{EXT[fmt]}"
    cs.remap(src, out, cs.Rules(keep=["tied.*", "int8"], drop=["tied.a"]))
    back = cs.load_state_dict(out)
    assert_bit_exact(back, {"int8": sd["int8"], "tied.b": sd["tied.b"]})


def test_reads_files_written_by_the_reference_safetensors(tmp_path: Path) -> None:
    sd = sample_state_dict()
    # save_file refuses shared and non-contiguous tensors; give it what it takes.
    plain = {n: t.contiguous().clone() for n, t in sd.items() if n != "tied.b"}
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(plain, path, metadata={"format": "pt"})
    with cs.open_checkpoint(path) as ckpt:
        assert ckpt.format == SAFETENSORS
        assert ckpt.metadata == {"format": "pt"}
        assert ckpt.aliases == {}
        got = ckpt.state_dict()
    # The reference writer orders the data by dtype alignment, not by the dict's order.
    assert_bit_exact(got, plain, ordered=False)


def test_slice_of_a_big_tensor_is_written_alone(tmp_path: Path) -> None:
    big = torch.zeros(256, 256)
    out = tmp_path / "small.pt"
    cs.save_state_dict({"row": big[3]}, out)
    assert out.stat().st_size < 16 * 1024  # the 256 KiB storage stayed behind
    t = torch.load(out, weights_only=True)["row"]
    assert t.untyped_storage().nbytes() == 256 * 4


def test_safetensors_data_is_aligned_and_keeps_key_order(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    sd = sample_state_dict()  # an odd-sized int8 tensor comes first
    cs.save_state_dict(sd, out)
    header = safetensors_header(out)
    header.pop("__metadata__")
    assert list(header) == [n for n in sd if n != "tied.b"]  # the header keeps the order
    (n,) = struct.unpack("<Q", out.read_bytes()[:8])
    assert (8 + n) % 8 == 0
    # ... the data does not: each tensor starts at a multiple of its element size, so that a
    # zero-copy reader can view the mapped bytes in place (torch refuses a misaligned view).
    whole = torch.frombuffer(bytearray(out.read_bytes()), dtype=torch.uint8)
    for name, entry in header.items():
        begin, end = (8 + n + o for o in entry["data_offsets"])
        assert begin % sd[name].element_size() == 0, name
        in_place = whole[begin:end].view(sd[name].dtype).reshape(sd[name].shape)
        assert raw(in_place) == raw(sd[name]), name
    assert list(cs.load_state_dict(out)) == list(sd)


def test_safetensors_metadata_must_be_strings(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    with pytest.raises(cs.OutputError, match=r"metadata 'epoch': 3: .*maps strings to strings"):
        cs.save_state_dict({"w": torch.ones(1)}, out, metadata={"epoch": 3})  # type: ignore[dict-item]
    with pytest.raises(cs.OutputError, match=r"'__metadata__' .*reserved.*--format torch"):
        cs.save_state_dict({"__metadata__": torch.ones(1)}, out)
    assert list(tmp_path.iterdir()) == []
    cs.save_state_dict({"w": torch.ones(1)}, out, metadata={"epoch": "3"})
    with cs.open_checkpoint(out) as ckpt:
        assert ckpt.metadata["epoch"] == "3"


# --- the format comes from the content, not the name ---------------------------------------


@pytest.mark.parametrize("name", ["x.bin", "x.ckpt", "x.pth.tar", "weights", "x.safetensors"])
def test_torch_zip_recognised_whatever_its_name(tmp_path: Path, name: str) -> None:
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    path = tmp_path / name
    torch.save(sd, path)
    assert detect_format(path) == TORCH_ZIP
    assert_bit_exact(cs.load_state_dict(path), sd)


@pytest.mark.parametrize("name", ["x.pt", "x.bin", "weights"])
def test_safetensors_recognised_whatever_its_name(tmp_path: Path, name: str) -> None:
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    path = tmp_path / name
    safetensors.torch.save_file(sd, path)
    assert detect_format(path) == SAFETENSORS
    assert_bit_exact(cs.load_state_dict(path), sd)


def _legacy_sample() -> dict[str, torch.Tensor]:
    # torch's own legacy reader cannot rebuild float8 storages (it fails with or without
    # weights_only); float8 is younger than the format, so no real legacy file holds it.
    return {n: t for n, t in sample_state_dict().items() if not n.startswith("float8")}


def test_legacy_torch_format_reads(tmp_path: Path) -> None:
    sd = _legacy_sample()
    path = tmp_path / "old.pth.tar"
    torch.save({"epoch": 3, "state_dict": sd}, path, _use_new_zipfile_serialization=False)
    assert detect_format(path) == TORCH_LEGACY
    with cs.open_checkpoint(path) as ckpt:
        assert ckpt.format == TORCH_LEGACY
        assert ckpt.key == "state_dict"
        got = ckpt.state_dict()
    assert_bit_exact(got, sd)
    assert_tied(got, "tied.a", "tied.b")


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_remap_from_legacy_source(tmp_path: Path, fmt: str) -> None:
    sd = _legacy_sample()
    src = tmp_path / "old.pth"
    torch.save(sd, src, _use_new_zipfile_serialization=False)
    out = tmp_path / f"out{EXT[fmt]}"
    cs.remap(src, out, cs.Rules())
    _check_output(out, fmt, sd)


# --- views that share memory but not values -------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_conjugate_and_negative_views_keep_their_values(tmp_path: Path, fmt: str) -> None:
    z = torch.complex(torch.tensor([1.0, 2.0]), torch.tensor([3.0, -4.0]))
    x = torch.tensor([0.0, 1.5, -2.0])
    # Same storage, offset, shape and strides as their base: not ties, different values.
    sd = {"z": z, "z_conj": z.conj(), "x": x, "x_neg": torch._neg_view(x)}
    out = tmp_path / f"out{EXT[fmt]}"
    cs.save_state_dict(sd, out)
    back = cs.load_state_dict(out)
    want = {n: t.resolve_conj().resolve_neg() for n, t in sd.items()}
    assert_bit_exact(back, want)
    assert back["z"].data_ptr() != back["z_conj"].data_ptr()
    assert not back["z_conj"].is_conj()


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_one_storage_seen_as_two_dtypes(tmp_path: Path, fmt: str) -> None:
    x = torch.tensor([1.0, -0.0, float("nan")])
    sd = {"value": x, "bits": x.view(torch.int32)}  # torch.save alone refuses this
    out = tmp_path / f"out{EXT[fmt]}"
    cs.save_state_dict(sd, out)
    assert_bit_exact(cs.load_state_dict(out), sd)


def test_sparse_and_quantized_are_refused_with_the_fix(tmp_path: Path) -> None:
    sparse = torch.eye(2).to_sparse()
    with pytest.raises(cs.FormatError, match=r"'s' is a torch\.sparse_coo tensor.*\.to_dense\(\)"):
        cs.save_state_dict({"s": sparse}, tmp_path / "out.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized dtypes are deprecated, but old files hold them
        q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    with pytest.raises(cs.FormatError, match=r"'q' is quantized .*dequantize it first"):
        cs.save_state_dict({"q": q}, tmp_path / "out.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_state_dict_on_the_gpu(tmp_path: Path, fmt: str) -> None:
    sd = sample_state_dict()
    on_gpu = {n: t.cuda() for n, t in sd.items() if n != "tied.b"}
    on_gpu["tied.b"] = on_gpu["tied.a"]
    on_gpu["gpu_slice"] = on_gpu["transposed"][1:3]
    out = tmp_path / f"out{EXT[fmt]}"
    cs.save_state_dict(on_gpu, out)
    want = {n: t.cpu() for n, t in on_gpu.items()}
    _check_output(out, fmt, want)  # bit-exact, tied, and on the CPU for a plain torch.load
    assert all(t.device.type == "cpu" for t in cs.load_state_dict(out).values())
    if fmt == "torch":
        assert all(t.device.type == "cpu" for t in torch.load(out, weights_only=True).values())
