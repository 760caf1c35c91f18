"""Sharded checkpoints: a Hugging Face index read as one checkpoint, and sharded output."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import (
    assert_bit_exact,
    assert_tied,
    cli_run,
    raw,
    safetensors_header,
    sample_state_dict,
)

import ckptsurgery as cs
from ckptsurgery.errors import FormatError, OutputError, SourceError, StateDictSelectionError
from ckptsurgery.io import parse_size
from ckptsurgery.io.dtypes import TensorInfo
from ckptsurgery.io.safetensors_format import ALIASES_KEY
from ckptsurgery.io.sharded import plan_shards

SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


def _sample() -> dict[str, torch.Tensor]:
    return sample_state_dict()  # every dtype, views, a tied pair


def _hf_sharded(folder: Path, sd: dict[str, torch.Tensor], per_shard: int = 3) -> Path:
    """A sharded checkpoint the way transformers writes one (safetensors.save_file)."""
    folder.mkdir()
    names = list(sd)
    chunks = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map, total = {}, 0
    for i, chunk in enumerate(chunks, 1):
        fname = f"model-{i:05d}-of-{len(chunks):05d}.safetensors"
        part = {n: sd[n].contiguous().clone() for n in chunk}
        safetensors.torch.save_file(part, folder / fname, metadata={"format": "pt"})
        weight_map.update((n, fname) for n in chunk)
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def _torch_sharded(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    """pytorch_model-0000N-of-0000M.bin shards and their index, as older transformers wrote."""
    folder.mkdir()
    names = list(sd)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, chunk in enumerate(halves, 1):
        fname = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({n: sd[n].clone() for n in chunk}, folder / fname)
        weight_map.update((n, fname) for n in chunk)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


def _plain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What safetensors can hold: no complex64 is fine, ties broken by the reference writer."""
    return {n: t for n, t in sd.items() if n != "tied.b"}


# --- reading ----------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["folder", "index"])
def test_reads_a_transformers_style_sharded_safetensors(tmp_path: Path, given: str) -> None:
    sd = _plain(_sample())
    folder = _hf_sharded(tmp_path / "hf", sd)
    src = folder if given == "folder" else folder / "model.safetensors.index.json"
    with cs.open_checkpoint(src) as ckpt:
        assert ckpt.format == "sharded-safetensors"
        assert ckpt.path == folder / "model.safetensors.index.json"
        assert sorted(ckpt.infos) == sorted(sd)
        got = ckpt.state_dict()
    assert_bit_exact(got, sd, ordered=False)


def test_reads_sharded_torch_bin(tmp_path: Path) -> None:
    sd = _sample()
    folder = _torch_sharded(tmp_path / "bin", {n: t for n, t in sd.items() if n != "tied.b"})
    with cs.open_checkpoint(folder) as ckpt:
        assert ckpt.format == "sharded-torch-zip"
        got = ckpt.state_dict()
    assert_bit_exact(got, {n: t for n, t in sd.items() if n != "tied.b"})
    out = tmp_path / "out.safetensors"
    cs.remap(folder, out, cs.Rules(strip_prefix=["tied."]))
    back = cs.load_state_dict(out)
    assert raw(back["a"]) == raw(sd["tied.a"])


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_folder_with_one_model_file(tmp_path: Path, name: str) -> None:
    sd = _sample()
    (tmp_path / "m").mkdir()
    if name.endswith(".bin"):
        torch.save(sd, tmp_path / "m" / name)
    else:
        cs.save_state_dict(sd, tmp_path / "m" / name)
    with cs.open_checkpoint(tmp_path / "m") as ckpt:
        assert ckpt.path == tmp_path / "m" / name
        got = ckpt.state_dict()
    assert_bit_exact(got, sd)
    assert_tied(got, "tied.a", "tied.b")


def test_folder_without_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"is a directory without a checkpoint: expected"):
        cs.open_checkpoint(tmp_path / "empty")


def test_key_does_not_apply(tmp_path: Path) -> None:
    folder = _hf_sharded(tmp_path / "hf", _plain(_sample()))
    with pytest.raises(StateDictSelectionError, match=r"sharded checkpoint.*--key does not apply"):
        cs.open_checkpoint(folder, key="model")


# --- hostile and broken indexes ----------------------------------------------------------


def _index(folder: Path) -> Path:
    return folder / "model.safetensors.index.json"


def _rewrite(folder: Path, change: object) -> None:
    doc = json.loads(_index(folder).read_text())
    change(doc)  # type: ignore[operator]
    _index(folder).write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "name",
    ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "a\\b.safetensors", "", "..",
     ".", "x\x00.safetensors"],
)  # fmt: skip
def test_shard_names_must_be_file_names_in_the_folder(tmp_path: Path, name: str) -> None:
    folder = _hf_sharded(tmp_path / "hf", _plain(_sample()))
    (tmp_path / "outside.safetensors").write_bytes(
        (folder / "model-00001-of-00005.safetensors").read_bytes()
    )

    def point_first_key_at(doc: dict[str, dict[str, str]]) -> None:
        doc["weight_map"][next(iter(doc["weight_map"]))] = name

    _rewrite(folder, point_first_key_at)
    with pytest.raises(FormatError, match=r"shard name .* must be a file name in the folder"):
        cs.open_checkpoint(folder)


def test_symlinked_shard_with_a_safe_name_is_fine(tmp_path: Path) -> None:
    sd = _plain(_sample())
    folder = _hf_sharded(tmp_path / "hf", sd)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in folder.glob("model-*.safetensors"):  # the Hugging Face cache layout
        target = blobs / shard.name
        shard.rename(target)
        shard.symlink_to(target)
    assert_bit_exact(cs.load_state_dict(folder), sd, ordered=False)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    folder = _hf_sharded(tmp_path / "hf", _plain(_sample()))
    (folder / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(SourceError, match=r"shard 'model-00002-of-00005.safetensors' .* missing"):
        cs.open_checkpoint(folder)


def test_key_listed_but_absent_from_its_shard(tmp_path: Path) -> None:
    folder = _hf_sharded(tmp_path / "hf", _plain(_sample()))
    _rewrite(
        folder,
        lambda doc: doc["weight_map"].update({"ghost.weight": "model-00001-of-00005.safetensors"}),
    )
    with pytest.raises(FormatError, match=r"puts 'ghost.weight' in shard .*which does not hold it"):
        cs.open_checkpoint(folder)


def test_key_in_the_wrong_shard(tmp_path: Path) -> None:
    folder = _hf_sharded(tmp_path / "hf", _plain(_sample()))
    _rewrite(
        folder, lambda doc: doc["weight_map"].update({"int8": "model-00002-of-00005.safetensors"})
    )
    with pytest.raises(FormatError, match=r"'int8' in shard .*\(it is in 'model-00001"):
        cs.open_checkpoint(folder)


def test_key_in_two_shards(tmp_path: Path) -> None:
    sd = _plain(_sample())
    folder = _hf_sharded(tmp_path / "hf", sd)
    shard = folder / "model-00002-of-00005.safetensors"
    part = safetensors.torch.load_file(shard)
    part["int8"] = sd["int8"]
    safetensors.torch.save_file(part, shard)
    with pytest.raises(FormatError, match=r"tensor 'int8' is in two shards"):
        cs.open_checkpoint(folder)


def test_tensor_in_a_shard_but_not_in_the_index(tmp_path: Path) -> None:
    folder = _hf_sharded(tmp_path / "hf", _plain(_sample()))
    _rewrite(folder, lambda doc: doc["weight_map"].pop("int8"))
    with pytest.raises(FormatError, match=r"holds 'int8', which the index does not list"):
        cs.open_checkpoint(folder)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "names 'a' twice"),
        ('{"metadata": {}}', 'with a "weight_map"'),
        ('{"weight_map": {"a": 3}}', "must map tensor names to shard file names"),
        ('{"weight_map": [}', "not JSON"),
        ('{"weight_map": {"a": NaN}}', "NaN"),
        ("{" * 100_000, "cannot be parsed|not JSON"),
    ],
)
def test_malformed_index(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(text)
    with pytest.raises(FormatError, match=message):
        cs.open_checkpoint(path)
    with pytest.raises(FormatError, match=message):
        cs.open_checkpoint(tmp_path)


# --- writing ------------------------------------------------------------------------------


@pytest.mark.parametrize("src_fmt", ["safetensors", "torch"])
def test_sharded_round_trip_is_bit_exact(tmp_path: Path, src_fmt: str) -> None:
    sd = _sample()
    src = tmp_path / ("src.safetensors" if src_fmt == "safetensors" else "src.pt")
    if src_fmt == "torch":
        torch.save(sd, src)
    else:
        cs.save_state_dict(sd, src)
    out = tmp_path / "sharded"
    result = cs.remap(src, out, cs.Rules(add_prefix="m."), max_shard_size=64)
    assert result.written is not None and result.written.path == out
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert files == [*shards, "model.safetensors.index.json"]
    assert result.written.shards == len(shards) > 1
    want = {f"m.{n}": t for n, t in sd.items()}
    back = cs.load_state_dict(out)
    assert_bit_exact(back, want)  # the original order, shard after shard
    assert_tied(back, "m.tied.a", "m.tied.b")
    # ... and back to one file, in both formats
    for ext in ("safetensors", "pt"):
        single = tmp_path / f"single.{ext}"
        cs.remap(out, single, cs.Rules(strip_prefix=["m."]))
        assert_bit_exact(cs.load_state_dict(single), sd)


def test_index_and_shards_match_what_transformers_writes(tmp_path: Path) -> None:
    sd = _sample()
    src = tmp_path / "src.safetensors"
    cs.save_state_dict(sd, src)
    out = tmp_path / "out"
    cs.remap(src, out, cs.Rules(), max_shard_size="100")
    index_text = (out / "model.safetensors.index.json").read_text()
    index = json.loads(index_text)
    # json.dumps(index, indent=2, sort_keys=True) + "\n", as save_pretrained writes it
    assert index_text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert list(index) == ["metadata", "weight_map"]
    weight_map = index["weight_map"]
    stored = {n: t for n, t in sd.items() if n != "tied.b"}  # the alias lives in metadata
    assert set(weight_map) == set(stored)
    assert index["metadata"] == {
        "total_size": sum(t.numel() * t.element_size() for t in stored.values())
    }
    shard_files = sorted(set(weight_map.values()))
    assert all(SHARD_RE.fullmatch(f) for f in shard_files)
    n = len(shard_files)
    assert [SHARD_RE.fullmatch(f).groups() for f in shard_files] == [  # type: ignore[union-attr]
        (f"{i:05d}", f"{n:05d}") for i in range(1, n + 1)
    ]
    seen: dict[str, str] = {}
    for fname in shard_files:
        header = safetensors_header(out / fname)
        meta = header.pop("__metadata__")
        assert meta["format"] == "pt"  # transformers refuses shards without it
        data = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
        assert data <= 100 or len(header) == 1
        # every shard loads with the reference reader, bit for bit
        loaded = safetensors.torch.load_file(out / fname)
        assert set(loaded) == set(header)
        for name, t in loaded.items():
            assert weight_map[name] == fname
            assert raw(t) == raw(sd[name]), name
            seen[name] = fname
    assert set(seen) == set(stored)
    tied_shard = out / weight_map["tied.a"]
    assert json.loads(safetensors_header(tied_shard)["__metadata__"][ALIASES_KEY]) == {
        "tied.b": "tied.a"
    }


def test_shard_plan_follows_huggingface_hub() -> None:
    info = lambda n: TensorInfo((n,), "uint8", n)  # noqa: E731
    items = [("a", info(40)), ("b", info(40)), ("big", info(500)), ("c", info(30)), ("d", info(90))]
    shards = plan_shards(items, 100)
    # huggingface_hub would put "big" first; closing the open shard first keeps the order
    assert [[n for n, _ in s] for s in shards] == [["a", "b"], ["big"], ["c"], ["d"]]


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1048576", 2**20),
     ("10kb", 10_000), ("1.5GB", 1_500_000_000), (" 7 MiB ", 7 * 2**20), (4096, 4096)],
)  # fmt: skip
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["5XB", "GB", "-1", "0", "1e9", ""])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(OutputError, match="--max-shard-size"):
        parse_size(text)


def test_output_given_as_an_index_path(tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    cs.save_state_dict(_sample(), src)
    out = tmp_path / "new" / "weights.safetensors.index.json"
    cs.remap(src, out, cs.Rules(), max_shard_size="1KB")
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["weights-00001-of-00001.safetensors", "weights.safetensors.index.json"]
    assert_bit_exact(cs.load_state_dict(out), _sample())
    with pytest.raises(OutputError, match=r"named <name>\.safetensors\.index\.json"):
        cs.remap(src, tmp_path / "w.index.json", cs.Rules(), max_shard_size="1KB")
    with pytest.raises(OutputError, match="safetensors shards"):
        cs.remap(src, tmp_path / "x", cs.Rules(), max_shard_size="1KB", format="torch")


def test_existing_output_folder_needs_force_and_keeps_other_files(tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    cs.save_state_dict(_sample(), src)
    out = tmp_path / "out"
    cs.remap(src, out, cs.Rules(), max_shard_size=64)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputError, match="already exists; pass --force"):
        cs.remap(src, out, cs.Rules(), max_shard_size=64)
    cs.remap(src, out, cs.Rules(add_prefix="x."), max_shard_size=10**6, force=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]
    assert "x.int8" in cs.load_state_dict(out)
    assert before  # the old shards are gone, replaced as a whole
    (out / "config.json").write_text("{}")
    with pytest.raises(OutputError, match=r"holds 'config\.json', which is not a checkpoint file"):
        cs.remap(src, out, cs.Rules(), max_shard_size=64, force=True)
    assert (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_folder_holding_the_input_is_refused(tmp_path: Path) -> None:
    folder = _hf_sharded(tmp_path / "hf", _plain(_sample()))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for out in (folder, folder / "model.safetensors.index.json"):
        with pytest.raises(OutputError, match="holds the input"):
            cs.remap(folder, out, cs.Rules(), max_shard_size="1GB", force=True)
    # a single-file output onto one of the shards is refused as well
    with pytest.raises(OutputError, match="part of the input"):
        cs.remap(folder, folder / "model-00001-of-00005.safetensors", cs.Rules(), force=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    from ckptsurgery.io.safetensors_format import SafetensorsCheckpoint

    src = tmp_path / "src.safetensors"
    cs.save_state_dict(_sample(), src)
    out = tmp_path / "out"
    cs.remap(src, out, cs.Rules(), max_shard_size=64)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    original = SafetensorsCheckpoint.write_data
    calls: list[str] = []

    def failing(self: SafetensorsCheckpoint, name: str, f: object) -> int:
        calls.append(name)
        if len(calls) > 5:
            raise exc
        return original(self, name, f)  # type: ignore[arg-type]

    monkeypatch.setattr(SafetensorsCheckpoint, "write_data", failing)
    with pytest.raises(type(exc)):
        cs.remap(src, out, cs.Rules(add_prefix="y."), max_shard_size=64, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # previous OUT intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.safetensors"]
    with pytest.raises(type(exc)):
        cs.remap(src, tmp_path / "new", cs.Rules(), max_shard_size=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.safetensors"]


def test_output_folder_mode_follows_umask(tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    cs.save_state_dict(_sample(), src)
    cs.remap(src, tmp_path / "out", cs.Rules(), max_shard_size=64)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask
    for p in (tmp_path / "out").iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask


# --- the command line ---------------------------------------------------------------------


def test_cli_remap_and_inspect_sharded(tmp_path: Path) -> None:
    sd = _sample()
    src = tmp_path / "src.pt"
    torch.save({"state_dict": {f"module.{n}": t for n, t in sd.items()}}, src)
    out = tmp_path / "hf"
    result = cli_run(
        "remap", src, "-o", out, "--strip-prefix", "module.", "--max-shard-size", "100B"
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"wrote 16 tensors, .* in \d+ shards to", result.stderr)
    assert_bit_exact(cs.load_state_dict(out), sd)
    result = cli_run("inspect", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "sharded-safetensors"
    assert [t["key"] for t in report["tensors"]] == list(sd)
    result = cli_run("remap", src, "-o", out, "--max-shard-size", "lots")
    assert result.exit_code == 2
    assert "Error: --max-shard-size 'lots'" in result.stderr


def test_symlinked_output_folder_and_dry_run(tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    cs.save_state_dict(_sample(), src)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputError, match="is a symbolic link"):
        cs.remap(src, tmp_path / "link", cs.Rules(), max_shard_size=64, force=True)
    result = cs.remap(src, tmp_path / "dry", cs.Rules(), max_shard_size=64, dry_run=True)
    assert result.written is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real", "src.safetensors"]


# --- merge and apply write shards as remap does ---------------------------------------------


def _assert_hf_sharded(out: Path, want: dict[str, torch.Tensor]) -> int:
    """``out`` holds safetensors shards and the index transformers reads, together ``want``
    bit for bit (tied aliases aside); returns the number of shards."""
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert list(index) == ["metadata", "weight_map"]
    weight_map = index["weight_map"]
    stored: dict[str, torch.Tensor] = {}
    for fname in sorted(set(weight_map.values())):
        assert SHARD_RE.fullmatch(fname), fname
        assert safetensors_header(out / fname)["__metadata__"]["format"] == "pt"
        shard = safetensors.torch.load_file(out / fname)
        assert {weight_map[n] for n in shard} == {fname}
        stored.update(shard)
    assert set(stored) == set(weight_map)
    assert index["metadata"] == {
        "total_size": sum(t.numel() * t.element_size() for t in stored.values())
    }
    assert_bit_exact(cs.load_state_dict(out), want)
    return len(set(weight_map.values()))


def test_merge_and_average_write_shards(tmp_path: Path) -> None:
    sd = _sample()
    names = list(sd)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    cs.save_state_dict({n: sd[n] for n in names[:8]}, a)
    cs.save_state_dict({n: sd[n] for n in names[8:]}, b)
    result = cs.merge_files([a, b], tmp_path / "union", max_shard_size="100")
    assert result.written is not None and result.written.shards > 1
    assert _assert_hf_sharded(tmp_path / "union", sd) == result.written.shards

    g = torch.Generator().manual_seed(1)
    x = {"w": torch.randn(40, 4, generator=g), "b": torch.randn(30, generator=g)}
    y = {k: torch.randn(v.shape, generator=g) for k, v in x.items()}
    cs.save_state_dict(x, tmp_path / "x.safetensors")
    cs.save_state_dict(y, tmp_path / "y.safetensors")
    out = tmp_path / "soup" / "model.safetensors.index.json"  # given as the index path
    result = cs.average_files(
        [tmp_path / "x.safetensors", tmp_path / "y.safetensors"], out, max_shard_size=200
    )
    assert result.written is not None and result.written.shards == 2
    assert _assert_hf_sharded(tmp_path / "soup", cs.average([x, y])) == 2


def test_merge_shards_refuses_torch_format_and_bad_sizes(tmp_path: Path) -> None:
    cs.save_state_dict(_sample(), tmp_path / "a.safetensors")
    with pytest.raises(OutputError, match="safetensors shards"):
        cs.merge_files([tmp_path / "a.safetensors"], tmp_path / "o", format="torch",
                       max_shard_size="1GB")  # fmt: skip
    with pytest.raises(OutputError, match="--max-shard-size 'lots'"):
        cs.merge_files([tmp_path / "a.safetensors"], tmp_path / "o", max_shard_size="lots")
    assert not (tmp_path / "o").exists()


def test_cli_merge_and_apply_max_shard_size(tmp_path: Path) -> None:
    sd = _sample()
    names = list(sd)
    cs.save_state_dict({f"backbone.{n}": sd[n] for n in names[:8]}, tmp_path / "a.safetensors")
    torch.save({"state_dict": {n: sd[n] for n in names[8:]}}, tmp_path / "b.pt")
    result = cli_run(
        "merge", tmp_path / "a.safetensors", tmp_path / "b.pt", "-o", tmp_path / "merged",
        "--max-shard-size", "100B",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert re.search(r"wrote 16 tensors, .* in \d+ shards to", result.stderr)
    want = {**{f"backbone.{n}": sd[n] for n in names[:8]}, **{n: sd[n] for n in names[8:]}}
    _assert_hf_sharded(tmp_path / "merged", want)

    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[[source]]\npath = "a.safetensors"\nstrip_prefix = ["backbone."]\n'
        '[[source]]\npath = "b.pt"\nkey = "state_dict"\n'
        '[output]\npath = "from_recipe"\nmax_shard_size = "100B"\n'
    )
    result = cli_run("apply", recipe)
    assert result.exit_code == 0, result.output
    n = _assert_hf_sharded(tmp_path / "from_recipe", sd)
    # --max-shard-size overrides the recipe's: one shard of everything
    result = cli_run("apply", recipe, "--force", "--max-shard-size", "1GB")
    assert result.exit_code == 0, result.output
    assert n > 1 and _assert_hf_sharded(tmp_path / "from_recipe", sd) == 1
