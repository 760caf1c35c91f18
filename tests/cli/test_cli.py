"""The command line through CliRunner: exit code, stdout and stderr checked apart.

Every checkpoint is tiny and built here, in ``tmp_path``.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    assert_error,
    assert_ok,
    cli_run,
    no_traceback,
    raw,
    safetensors_header,
    source_digest,
)
from safetensors.torch import load_file, save_file

# -- helpers ----------------------------------------------------------------------------------


def lines(text: str) -> list[str]:
    return text.splitlines()


def bits(values: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A float tensor from raw integer bit patterns (NaN payloads, -0.0)."""
    code = {torch.float32: "I", torch.float16: "H", torch.bfloat16: "H"}[dtype]
    data = bytearray(struct.pack(f"<{len(values)}{code}", *values))
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).clone()


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def st_keys(path: Path) -> list[str]:
    """Tensor names of a safetensors file in header order (read by hand, not by the library)."""
    header = safetensors_header(path)
    header.pop("__metadata__", None)
    return list(header)


def encoder(seed: int) -> dict[str, torch.Tensor]:
    """A resnet-like encoder in a few hundred bytes, with awkward values and dtypes."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv1.weight": torch.randn(2, 3, 1, 1, generator=g),
        "bn1.weight": bits([0x7FC12345, 0x80000000, 0x7F800000], torch.float32),  # NaN, -0, inf
        "bn1.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "bn1.running_mean": bits([0x7E01, 0x8000, 0x3C00], torch.float16),
        "bn1.running_var": torch.rand(3, generator=g),
        "bn1.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
        "layer1.0.conv1.weight": torch.randn(3, 3, 1, 1, generator=g),
        "fc.0.weight": torch.randn(4, 3, generator=g),
        "fc.0.bias": torch.randn(4, generator=g),
        "fc.2.weight": torch.randn(2, 4, generator=g),
        "fc.2.bias": torch.randn(2, generator=g),
    }


def moco_state_dict() -> dict[str, torch.Tensor]:
    sd = {f"module.encoder_q.{k}": v for k, v in encoder(1).items()}
    sd |= {f"module.encoder_k.{k}": v for k, v in encoder(2).items()}
    return sd


def make_moco(folder: Path, name: str = "moco_v2.pth.tar") -> Path:
    """A MoCo v2 training checkpoint: the state dict nested among other entries."""
    path = folder / name
    torch.save(
        {
            "epoch": 200,
            "arch": "resnet50",
            "state_dict": moco_state_dict(),
            "optimizer": {
                "state": {0: {"momentum_buffer": torch.zeros(2)}},
                "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0]}],
            },
        },
        path,
    )
    return path


def make_safetensors(folder: Path, name: str = "model.safetensors") -> Path:
    path = folder / name
    save_file(
        {
            "encoder.conv.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "encoder.conv.bias": torch.zeros(2, dtype=torch.float16),
            "head.weight": torch.ones(4, 2),
        },
        str(path),
    )
    return path


def make_flat_torch(folder: Path, name: str = "flat.pt") -> Path:
    path = folder / name
    torch.save(
        {"a.weight": torch.ones(2, 2), "a.bias": torch.zeros(2), "b.weight": torch.ones(3)}, path
    )
    return path


def make_ambiguous(folder: Path) -> Path:
    path = folder / "dino.pth"
    torch.save(
        {
            "model": {
                "student": {"backbone.w": torch.zeros(2)},
                "teacher": {"backbone.w": torch.ones(2)},
            },
            "epoch": 3,
        },
        path,
    )
    return path


class Evil:
    """Pickles as a call to os.system: loading it must never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def make_malicious(folder: Path) -> tuple[Path, Path]:
    marker = folder / "PWNED"
    path = folder / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Evil(marker)}, path)
    return path, marker


def make_with_namespace(folder: Path) -> Path:
    path = folder / "args.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    return path


# -- inspect ----------------------------------------------------------------------------------


def test_inspect_table(tmp_path: Path) -> None:
    src = make_safetensors(tmp_path)
    result = cli_run("inspect", src)
    assert_ok(result)
    assert result.stderr == ""
    out = lines(result.stdout)
    assert out[0] == f"source: {src}  format: safetensors"
    header = next(i for i, line in enumerate(out) if line.startswith("key"))
    assert out[header].split() == ["key", "shape", "dtype", "numel"]
    rows = [line.split(maxsplit=1) for line in out[header + 2 : header + 5]]
    assert dict(rows) == {
        "encoder.conv.weight": "[2, 3]   float32  6",
        "encoder.conv.bias": "[2]      float16  2",
        "head.weight": "[4, 2]   float32  8",
    }
    assert "3 tensors, 16 parameters, 60 B" in out
    assert "other entry" not in result.stdout
    assert "provenance" not in result.stdout


def test_inspect_totals_in_the_singular(tmp_path: Path) -> None:
    src = tmp_path / "one.safetensors"
    save_file({"w": torch.ones(1)}, str(src))
    result = cli_run("inspect", src)
    assert_ok(result)
    assert "1 tensor, 1 parameter, 4 B" in lines(result.stdout)


def test_inspect_json_schema(tmp_path: Path) -> None:
    src = make_safetensors(tmp_path)
    result = cli_run("inspect", src, "--json")
    assert_ok(result)
    assert result.stderr == ""
    report = json.loads(result.stdout)
    required = {
        "source",
        "format",
        "key",
        "tensors",
        "total_params",
        "total_bytes",
        "other_entries",
    }
    assert required <= set(report)
    assert report["source"] == str(src)
    assert report["format"] == "safetensors"
    assert report["key"] is None
    assert sorted(report["tensors"], key=lambda t: t["key"]) == [
        {"key": "encoder.conv.bias", "shape": [2], "dtype": "float16", "numel": 2},
        {"key": "encoder.conv.weight", "shape": [2, 3], "dtype": "float32", "numel": 6},
        {"key": "head.weight", "shape": [4, 2], "dtype": "float32", "numel": 8},
    ]
    for t in report["tensors"]:
        assert {"key", "shape", "dtype", "numel"} <= set(t)
    assert report["total_params"] == 16
    assert report["total_bytes"] == 6 * 4 + 2 * 2 + 8 * 4
    assert report["other_entries"] in ({}, [])


def test_inspect_nested_checkpoint_notes_the_selection(tmp_path: Path) -> None:
    src = make_moco(tmp_path)
    result = cli_run("inspect", src)
    assert_ok(result)
    assert lines(result.stderr) == [
        "using the state dict at 'state_dict' (other entries: epoch, arch, optimizer)"
    ]
    assert f"source: {src}  format: torch-zip  key: state_dict" in result.stdout
    assert "module.encoder_q.bn1.num_batches_tracked  []" in result.stdout
    assert "22 tensors" in result.stdout
    # other top-level entries by name and type
    other = result.stdout[result.stdout.index("other entry") :]
    assert [line.split() for line in lines(other)[2:]] == [
        ["epoch", "int"],
        ["arch", "str"],
        ["optimizer", "dict"],
    ]


def test_inspect_json_nested(tmp_path: Path) -> None:
    src = make_moco(tmp_path)
    result = cli_run("inspect", src, "--json")
    assert_ok(result)
    assert "using the state dict at 'state_dict'" in result.stderr
    report = json.loads(result.stdout)  # the note did not leak into stdout
    assert report["format"] == "torch-zip"
    assert report["key"] == "state_dict"
    assert report["other_entries"] == {"epoch": "int", "arch": "str", "optimizer": "dict"}
    sd = moco_state_dict()
    assert [t["key"] for t in report["tensors"]] == list(sd)
    assert report["total_params"] == sum(t.numel() for t in sd.values())
    assert report["total_bytes"] == sum(t.numel() * t.element_size() for t in sd.values())
    by_key = {t["key"]: t for t in report["tensors"]}
    assert by_key["module.encoder_q.bn1.bias"]["dtype"] == "bfloat16"
    assert by_key["module.encoder_q.bn1.num_batches_tracked"]["shape"] == []
    assert by_key["module.encoder_q.bn1.num_batches_tracked"]["numel"] == 1


def test_inspect_depth_groups_keys(tmp_path: Path) -> None:
    src = make_moco(tmp_path)
    result = cli_run("inspect", src, "--depth", "2")
    assert_ok(result)
    out = lines(result.stdout)
    header = next(i for i, line in enumerate(out) if line.startswith("group"))
    assert out[header].split() == ["group", "tensors", "params", "bytes"]
    rows = [line.split()[:3] for line in out[header + 2 : header + 4]]
    per_encoder = sum(t.numel() for t in encoder(1).values())
    assert rows == [
        ["module.encoder_q", "11", str(per_encoder)],
        ["module.encoder_k", "11", str(per_encoder)],
    ]
    assert out[header + 4] == ""

    result = cli_run("inspect", src, "--depth", "3", "--json")
    assert_ok(result)
    groups = {g["group"]: g for g in json.loads(result.stdout)["groups"]}
    assert groups["module.encoder_q.bn1"]["tensors"] == 5
    assert groups["module.encoder_q.fc"]["tensors"] == 4
    assert groups["module.encoder_q.fc"]["params"] == 4 * 3 + 4 + 2 * 4 + 2
    assert groups["module.encoder_q.fc"]["bytes"] == (4 * 3 + 4 + 2 * 4 + 2) * 4
    assert groups["module.encoder_k.conv1"]["tensors"] == 1


def test_inspect_depth_must_be_positive(tmp_path: Path) -> None:
    src = make_safetensors(tmp_path)
    assert_error(cli_run("inspect", src, "--depth", "0"), "--depth")


def test_inspect_shows_tied_tensors(tmp_path: Path) -> None:
    src = tmp_path / "tied.pt"
    emb = torch.randn(3, 2)
    torch.save({"embed.weight": emb, "lm_head.weight": emb}, src)
    result = cli_run("inspect", src)
    assert_ok(result)
    assert "lm_head.weight (tied to embed.weight)" in result.stdout
    assert "2 tensors, 1 tied, 6 parameters, 24 B" in result.stdout


def test_inspect_shows_provenance_of_a_remapped_file(tmp_path: Path) -> None:
    src = make_moco(tmp_path)
    out = tmp_path / "backbone.safetensors"
    assert_ok(
        cli_run(
            "remap",
            src,
            "-o",
            out,
            "--keep",
            "module.encoder_q.*",
            "--strip-prefix",
            "module.encoder_q.",
        )
    )
    result = cli_run("inspect", out)
    assert_ok(result)
    assert result.stderr == ""
    text = result.stdout
    assert "provenance:" in text
    after = lines(text[text.index("provenance:") :])
    assert after[1].startswith("  version: ")
    assert any(line.startswith("  sources: ") and "moco_v2.pth.tar" in line for line in after)
    assert any(
        line.startswith("  rules: ") and '"strip_prefix": ["module.encoder_q."]' in line
        for line in after
    )
    report = json.loads(cli_run("inspect", out, "--json").stdout)

    (source,) = report["provenance"]["sources"]
    assert source == {
        "name": "moco_v2.pth.tar",
        **source_digest(src),
        "key": "state_dict",
    }
    assert report["provenance"]["rules"] == {
        "keep": ["module.encoder_q.*"],
        "strip_prefix": ["module.encoder_q."],
    }


def test_inspect_flat_torch_file(tmp_path: Path) -> None:
    src = make_flat_torch(tmp_path)
    result = cli_run("inspect", src, "--json")
    assert_ok(result)
    assert result.stderr == ""
    report = json.loads(result.stdout)
    assert report["key"] is None
    assert report["other_entries"] == {}
    assert [t["key"] for t in report["tensors"]] == ["a.weight", "a.bias", "b.weight"]


# -- remap: each rule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--keep", "a.*"], ["a.weight", "a.bias"]),
        (["--keep", "b.*", "--keep", "*.bias"], ["a.bias", "b.weight"]),
        (["--drop", "*.bias"], ["a.weight", "b.weight"]),
        (["--drop", "a.*", "--drop", "b.*", "--keep", "*"], None),
        (["--strip-prefix", "a."], ["weight", "bias", "b.weight"]),
        (["--strip-prefix", "a.", "--strip-prefix", "b."], None),  # collision: weight
        (["--replace", "weight", "w", "--replace", "w", "W"], ["a.W", "a.bias", "b.W"]),
        (["--regex", r"^(\w)\.", r"\1_"], ["a_weight", "a_bias", "b_weight"]),
        (["--add-prefix", "model."], ["model.a.weight", "model.a.bias", "model.b.weight"]),
        (
            ["--add-prefix", "m.", "--strip-prefix", "a.", "--keep", "a.*"],
            ["m.weight", "m.bias"],
        ),
    ],
)
def test_remap_rule_flags(tmp_path: Path, flags: list[str], expected: list[str] | None) -> None:
    src = make_flat_torch(tmp_path)
    out = tmp_path / "out.safetensors"
    result = cli_run("remap", src, "-o", out, *flags)
    if expected is None:
        assert_error(result)
        assert not out.exists()
        return
    assert_ok(result)
    assert st_keys(out) == expected
    original = torch.load(src, weights_only=True)
    written = load_file(str(out))
    plan = json.loads(cli_run("remap", src, "-o", out, *flags, "--dry-run", "--json").stdout)
    for pair in plan["renames"]:
        assert raw(written[pair["new"]]) == raw(original[pair["old"]])


def test_remap_rules_file(tmp_path: Path) -> None:
    src = make_moco(tmp_path)
    rules = tmp_path / "moco.toml"
    rules.write_text(
        'key = "state_dict"\n'
        'keep = ["module.encoder_q.*"]\n'
        'drop = "module.encoder_q.fc.*"\n'
        'strip_prefix = ["module.encoder_q."]\n'
        'replace = [["bn1", "norm1"]]\n',
        encoding="utf-8",
    )
    out = tmp_path / "out.safetensors"
    result = cli_run("remap", src, "-o", out, "--rules", rules)
    assert_ok(result)
    assert st_keys(out) == [
        "conv1.weight",
        "norm1.weight",
        "norm1.bias",
        "norm1.running_mean",
        "norm1.running_var",
        "norm1.num_batches_tracked",
        "layer1.0.conv1.weight",
    ]


def test_remap_rules_file_then_flags(tmp_path: Path) -> None:
    src = make_moco(tmp_path)
    rules = tmp_path / "r.toml"
    rules.write_text('keep = ["module.encoder_q.*"]\nstrip_prefix = ["module."]\n')
    out = tmp_path / "out.safetensors"
    # the file's strip runs first, so the flag's prefix is there to strip
    result = cli_run(
        "remap",
        src,
        "-o",
        out,
        "--rules",
        rules,
        "--strip-prefix",
        "encoder_q.",
        "--drop",
        "module.encoder_q.fc.*",
        "--add-prefix",
        "backbone.",
    )
    assert_ok(result)
    keys = st_keys(out)
    assert keys[0] == "backbone.conv1.weight"
    assert len(keys) == 7
    assert not any(".fc." in k for k in keys)
    meta = safetensors_header(out)["__metadata__"]
    assert json.loads(meta["ckptsurgery.rules"]) == {
        "keep": ["module.encoder_q.*"],
        "drop": ["module.encoder_q.fc.*"],
        "strip_prefix": ["module.", "encoder_q."],
        "add_prefix": "backbone.",
    }


def test_remap_key_flag_overrides_the_rules_file(tmp_path: Path) -> None:
    src = make_ambiguous(tmp_path)
    rules = tmp_path / "r.toml"
    rules.write_text('key = "model/teacher"\n')
    out = tmp_path / "out.safetensors"
    assert_ok(cli_run("remap", src, "-o", out, "--rules", rules))
    assert raw(load_file(str(out))["backbone.w"]) == raw(torch.ones(2))
    out.unlink()
    assert_ok(cli_run("remap", src, "-o", out, "--rules", rules, "--key", "model/student"))
    assert raw(load_file(str(out))["backbone.w"]) == raw(torch.zeros(2))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("keep = [\n", "is not valid TOML"),
        ('path = "x.pt"\n', "'path' belongs in a recipe"),
        ('kep = ["a"]\n', "unknown field 'kep'"),
        ('strip_prefix = [""]\n', "empty prefix"),
    ],
)
def test_remap_bad_rules_file(tmp_path: Path, text: str, fragment: str) -> None:
    src = make_flat_torch(tmp_path)
    rules = tmp_path / "r.toml"
    rules.write_text(text)
    out = tmp_path / "out.safetensors"
    assert_error(cli_run("remap", src, "-o", out, "--rules", rules), "r.toml", fragment)
    assert not out.exists()


def test_remap_missing_rules_file(tmp_path: Path) -> None:
    src = make_flat_torch(tmp_path)
    assert_error(
        cli_run("remap", src, "-o", tmp_path / "o.pt", "--rules", tmp_path / "nope.toml"),
        "nope.toml",
        "does not exist",
    )


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--regex", "(", "x"], "not a valid regular expression"),
        (["--regex", "a", r"\1"], "invalid group reference"),
        (["--strip-prefix", ""], "empty prefix"),
        (["--replace", "", "x"], "must not be empty"),
    ],
)
def test_remap_bad_rule_flags(tmp_path: Path, flags: list[str], fragment: str) -> None:
    src = make_moco(tmp_path)  # a nested file: the error comes before it is read (no note)
    out = tmp_path / "out.safetensors"
    assert_error(cli_run("remap", src, "-o", out, *flags), fragment)
    assert not out.exists()


# -- remap: dry run, json, summary, notes -----------------------------------------------------


def test_remap_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    src = make_flat_torch(tmp_path)
    out = tmp_path / "out.safetensors"
    before = files_in(tmp_path)
    result = cli_run(
        "remap",
        src,
        "-o",
        out,
        "--drop",
        "b.*",
        "--strip-prefix",
        "a.",
        "--replace",
        "zz",
        "y",
        "--dry-run",
    )
    assert_ok(result)
    assert files_in(tmp_path) == before
    out_lines = [line.split() for line in lines(result.stdout)]
    assert ["key", "new", "key", "op", "shape", "dtype", "bytes"] in out_lines
    assert ["a.weight", "->", "weight", "copy", "[2,", "2]", "float32", "16", "B"] in out_lines
    assert ["a.bias", "->", "bias", "copy", "[2]", "float32", "8", "B"] in out_lines
    assert ["2", "tensors,", "24", "B", "to", "write"] in out_lines
    assert ["dropped"] in out_lines
    assert ["b.weight"] in out_lines
    assert ["rule", "keys"] in out_lines
    assert ["--drop", "'b.*'", "1"] in out_lines
    assert ["--strip-prefix", "a.", "2"] in out_lines
    assert ["--replace", "zz", "y", "0"] in out_lines
    assert lines(result.stderr) == [
        "note: --replace zz y matched no key",
        "dry run: would keep 2 of 3 keys (2 renamed), drop 1; nothing written",
    ]


def test_remap_dry_run_unchanged_keys_are_marked(tmp_path: Path) -> None:
    src = make_flat_torch(tmp_path)
    result = cli_run("remap", src, "--replace", "bias", "b", "--dry-run")  # -o may be left out
    assert_ok(result)
    out_lines = [line.split()[:3] for line in lines(result.stdout)]
    assert ["a.weight", "==", "a.weight"] in out_lines
    assert ["a.bias", "->", "a.b"] in out_lines
    assert "dropped" not in result.stdout
    assert "would keep 3 of 3 keys (1 renamed), drop 0" in result.stderr


def test_remap_dry_run_ignores_an_existing_output(tmp_path: Path) -> None:
    src = make_flat_torch(tmp_path)
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    assert_ok(cli_run("remap", src, "-o", out, "--dry-run"))
    assert out.read_bytes() == b"precious"


def test_remap_dry_run_json(tmp_path: Path) -> None:
    src = make_moco(tmp_path)
    out = tmp_path / "out.safetensors"
    result = cli_run(
        "remap",
        src,
        "-o",
        out,
        "--keep",
        "module.encoder_q.*",
        "--drop",
        "*.fc.*",
        "--strip-prefix",
        "module.encoder_q.",
        "--dry-run",
        "--json",
    )
    assert_ok(result)
    assert not out.exists()
    plan = json.loads(result.stdout)
    assert plan["key"] == "state_dict"
    assert plan["rules"] == {
        "keep": ["module.encoder_q.*"],
        "drop": ["*.fc.*"],
        "strip_prefix": ["module.encoder_q."],
    }
    assert plan["renames"][0] == {"old": "module.encoder_q.conv1.weight", "new": "conv1.weight"}
    assert len(plan["renames"]) == 7
    assert len(plan["dropped"]) == 15
    assert plan["rule_counts"] == [
        {"rule": "--keep 'module.encoder_q.*'", "keys": 11},
        {"rule": "--drop '*.fc.*'", "keys": 4},
        {"rule": "--strip-prefix module.encoder_q.", "keys": 7},
    ]


def test_remap_json_after_writing(tmp_path: Path) -> None:
    src = make_safetensors(tmp_path)
    out = tmp_path / "out.safetensors"
    result = cli_run("remap", src, "-o", out, "--add-prefix", "m.", "--json")
    assert_ok(result)
    report = json.loads(result.stdout)
    assert report["output"] == str(out)
    assert report["format"] == "safetensors"
    assert report["tensors"] == 3
    assert report["bytes"] == out.stat().st_size
    # in the source's data order (safetensors' save_file stores wider dtypes first)
    assert [r["new"] for r in report["renames"]] == [
        "m.encoder.conv.weight",
        "m.head.weight",
        "m.encoder.conv.bias",
    ]
    assert st_keys(out) == [r["new"] for r in report["renames"]]
    assert "wrote 3 tensors" in result.stderr


def test_remap_summary_line(tmp_path: Path) -> None:
    src = make_flat_torch(tmp_path)
    out = tmp_path / "out.safetensors"
    result = cli_run("remap", src, "-o", out, "--drop", "b.*", "--replace", "weight", "w")
    assert_ok(result)
    assert result.stdout == ""
    size = out.stat().st_size
    assert lines(result.stderr) == [
        f"kept 2 of 3 keys (1 renamed), dropped 1; wrote 2 tensors, {size} B to {out}"
    ]


def test_remap_unused_rule_note(tmp_path: Path) -> None:
    src = make_flat_torch(tmp_path)
    out = tmp_path / "out.safetensors"
    result = cli_run(
        "remap",
        src,
        "-o",
        out,
        "--keep",
        "*",
        "--drop",
        "nothing.*",
        "--strip-prefix",
        "zz.",
        "--regex",
        "q+",
        "r",
    )
    assert_ok(result)
    assert out.exists()
    notes = [line for line in lines(result.stderr) if line.startswith("note:")]
    assert notes == [
        "note: --drop 'nothing.*' matched no key",
        "note: --strip-prefix zz. matched no key",
        "note: --regex q+ r matched no key",
    ]


def test_remap_collision(tmp_path: Path) -> None:
    src = make_moco(tmp_path)
    out = tmp_path / "out.safetensors"
    result = cli_run(
        "remap",
        src,
        "-o",
        out,
        "--strip-prefix",
        "module.encoder_q.",
        "--strip-prefix",
        "module.encoder_k.",
    )
    error = assert_error(
        result,
        "'module.encoder_q.conv1.weight'",
        "'module.encoder_k.conv1.weight'",
        "'conv1.weight'",
        only_line=False,
    )
    assert error.startswith("Error: the rules rename several keys to the same name")
    assert not out.exists()
    assert files_in(tmp_path) == {"moco_v2.pth.tar"}


def test_remap_dropping_every_key_is_an_error(tmp_path: Path) -> None:
    src = make_flat_torch(tmp_path)
    out = tmp_path / "out.safetensors"
    assert_error(
        cli_run("remap", src, "-o", out, "--keep", "zzz*"), "drop every key", only_line=False
    )
    assert not out.exists()


def test_remap_needs_an_output_unless_dry_run(tmp_path: Path) -> None:
    src = make_flat_torch(tmp_path)
    assert_error(cli_run("remap", src, "--add-prefix", "x."), "-o")


# -- remap: output --------------------------------------------------------------------------


def test_remap_refuses_an_existing_output_without_force(tmp_path: Path) -> None:
    src = make_flat_torch(tmp_path)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"do not touch")
    assert_error(cli_run("remap", src, "-o", out), str(out), "--force")
    assert out.read_bytes() == b"do not touch"
    assert files_in(tmp_path) == {"flat.pt", "out.safetensors"}

    assert_ok(cli_run("remap", src, "-o", out, "--force"))
    assert st_keys(out) == ["a.weight", "a.bias", "b.weight"]


@pytest.mark.parametrize("force", [False, True])
def test_remap_refuses_to_write_over_its_source(tmp_path: Path, force: bool) -> None:
    src = make_flat_torch(tmp_path, "flat.pt")
    before = src.read_bytes()
    args: list[str | Path] = ["remap", src, "-o", src, "--add-prefix", "x."]
    args += ["--force"] if force else []
    assert_error(cli_run(*args), "is the input")
    assert src.read_bytes() == before
    # the same file by another spelling
    args[3] = tmp_path / "." / "flat.pt"
    assert_error(cli_run(*args), "is the input")
    assert src.read_bytes() == before
    assert files_in(tmp_path) == {"flat.pt"}


def test_remap_torch_format_with_an_odd_extension(tmp_path: Path) -> None:
    src = make_moco(tmp_path)
    out = tmp_path / "backbone.weights"
    result = cli_run(
        "remap",
        src,
        "-o",
        out,
        "--format",
        "torch",
        "--keep",
        "module.encoder_q.*",
        "--strip-prefix",
        "module.encoder_q.",
    )
    assert_ok(result)
    sd = torch.load(out, weights_only=True)
    source = moco_state_dict()
    assert list(sd) == list(encoder(1))
    for name, t in sd.items():
        want = source[f"module.encoder_q.{name}"]
        assert t.dtype == want.dtype and t.shape == want.shape
        assert raw(t) == raw(want), name


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_remap_torch_format_from_the_extension(tmp_path: Path, suffix: str) -> None:
    src = make_safetensors(tmp_path)
    out = tmp_path / f"out{suffix}"
    assert_ok(cli_run("remap", src, "-o", out, "--strip-prefix", "encoder."))
    sd = torch.load(out, weights_only=True)
    assert list(sd) == ["conv.weight", "head.weight", "conv.bias"]
    assert raw(sd["conv.bias"]) == raw(torch.zeros(2, dtype=torch.float16))


def test_remap_safetensors_format_flag(tmp_path: Path) -> None:
    src = make_flat_torch(tmp_path)
    out = tmp_path / "out.pt"  # the flag wins over the extension
    assert_ok(cli_run("remap", src, "-o", out, "--format", "safetensors"))
    assert st_keys(out) == ["a.weight", "a.bias", "b.weight"]


@pytest.mark.parametrize("name", ["out.weird", "out", "out.pth.tar"])
def test_remap_unknown_output_extension(tmp_path: Path, name: str) -> None:
    src = make_flat_torch(tmp_path)
    out = tmp_path / name
    assert_error(cli_run("remap", src, "-o", out), "--format safetensors|torch", repr(name))
    assert files_in(tmp_path) == {"flat.pt"}


def test_remap_unknown_format_choice(tmp_path: Path) -> None:
    src = make_flat_torch(tmp_path)
    assert_error(cli_run("remap", src, "-o", tmp_path / "x.pt", "--format", "onnx"), "--format")


def test_remap_output_folder_missing(tmp_path: Path) -> None:
    src = make_flat_torch(tmp_path)
    assert_error(cli_run("remap", src, "-o", tmp_path / "nope" / "out.pt"), "does not exist")


def test_remap_output_is_a_folder(tmp_path: Path) -> None:
    src = make_flat_torch(tmp_path)
    (tmp_path / "d.pt").mkdir()
    assert_error(cli_run("remap", src, "-o", tmp_path / "d.pt", "--force"), "is a directory")


def test_remap_safetensors_to_safetensors_rename_only(tmp_path: Path) -> None:
    src = make_safetensors(tmp_path)
    out = tmp_path / "out.safetensors"
    assert_ok(cli_run("remap", src, "-o", out, "--replace", "encoder.", "backbone."))
    got, want = load_file(str(out)), load_file(str(src))
    assert st_keys(out) == ["backbone.conv.weight", "head.weight", "backbone.conv.bias"]
    for name, t in want.items():
        assert raw(got[name.replace("encoder.", "backbone.")]) == raw(t)


# -- selecting the state dict ----------------------------------------------------------------


def test_ambiguous_nested_state_dicts(tmp_path: Path) -> None:
    src = make_ambiguous(tmp_path)
    result = cli_run("remap", src, "-o", tmp_path / "out.safetensors")
    # the hint names the teacher (the weights fine-tuning starts from), not the first listed
    assert_error(result, "model/student", "model/teacher", "--key", "e.g. --key model/teacher")
    assert files_in(tmp_path) == {"dino.pth"}


def test_inspect_lists_several_state_dicts(tmp_path: Path) -> None:
    src = make_ambiguous(tmp_path)
    result = cli_run("inspect", src)
    assert_ok(result)
    assert "2 state dicts in this file" in result.stdout
    for line in ("model/student", "model/teacher"):
        assert line in result.stdout
    assert "--key model/teacher" in result.stdout and "epoch" in result.stdout

    report = json.loads(cli_run("inspect", src, "--json").stdout)
    assert report["candidates"] == [
        {"key": "model/student", "tensors": 1, "params": 2, "bytes": 8},
        {"key": "model/teacher", "tensors": 1, "params": 2, "bytes": 8},
    ]
    assert report["selected"] is None and report["preferred"] == "model/teacher"
    assert report["key"] is None and report["tensors"] == []
    assert report["other_entries"] == {"epoch": "int"}
    assert report["format"] == "torch-zip"


def test_key_selects_a_nested_state_dict(tmp_path: Path) -> None:
    src = make_ambiguous(tmp_path)
    result = cli_run("inspect", src, "--key", "model/teacher", "--json")
    assert_ok(result)
    assert result.stderr == ""  # chosen by the user: no note
    report = json.loads(result.stdout)
    assert report["key"] == "model/teacher"
    assert report["other_entries"] == {"epoch": "int"}

    out = tmp_path / "student.safetensors"
    result = cli_run(
        "remap", src, "--key", "model/student", "-o", out, "--strip-prefix", "backbone."
    )
    assert_ok(result)
    assert raw(load_file(str(out))["w"]) == raw(torch.zeros(2))


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("nope", "no entry 'nope'"),
        ("model/nope", "no entry 'nope' at model"),
        ("epoch/x", "not a mapping"),
        ("model", "not a state dict"),
    ],
)
def test_bad_key(tmp_path: Path, key: str, fragment: str) -> None:
    src = make_ambiguous(tmp_path)
    assert_error(cli_run("inspect", src, "--key", key), fragment)


def test_key_on_a_safetensors_file(tmp_path: Path) -> None:
    src = make_safetensors(tmp_path)
    assert_error(cli_run("inspect", src, "--key", "state_dict"), "--key does not apply")


# -- unsafe pickles ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "remap"])
def test_malicious_pickle_is_refused(tmp_path: Path, command: str) -> None:
    src, marker = make_malicious(tmp_path)
    args: list[str | Path] = [command, src]
    out = tmp_path / "out.safetensors"
    if command == "remap":
        args += ["-o", out]
    assert_error(cli_run(*args), "posix.system", "--unsafe-pickle", "--allow-global")
    assert not marker.exists()  # nothing ran
    assert not out.exists()


def test_unsafe_global_needs_trust(tmp_path: Path) -> None:
    src = make_with_namespace(tmp_path)
    assert_error(
        cli_run("inspect", src),
        "argparse.Namespace",
        "--allow-global argparse.Namespace",
        "--unsafe-pickle",
    )

    result = cli_run("inspect", src, "--allow-global", "argparse.Namespace")
    assert_ok(result)
    assert "Warning" not in result.stderr
    assert "args           argparse.Namespace" in result.stdout


def test_unsafe_pickle_prints_a_warning(tmp_path: Path) -> None:
    src = make_with_namespace(tmp_path)
    out = tmp_path / "out.safetensors"
    result = cli_run("remap", src, "-o", out, "--unsafe-pickle")
    assert_ok(result)
    warnings = [line for line in lines(result.stderr) if line.startswith("Warning:")]
    assert len(warnings) == 1
    assert "--unsafe-pickle" in warnings[0]
    assert st_keys(out) == ["w"]


def test_allow_global_that_cannot_be_imported(tmp_path: Path) -> None:
    src = make_with_namespace(tmp_path)
    assert_error(cli_run("inspect", src, "--allow-global", "no_such_module.Thing"), "cannot import")


# -- scan -------------------------------------------------------------------------------------


def test_scan_safe_file(tmp_path: Path) -> None:
    src = make_moco(tmp_path)
    result = cli_run("scan", src)
    assert_ok(result)
    rows = [line.split() for line in lines(result.stdout)]
    assert rows[0] == ["global", "verdict"]
    assert ["torch._utils._rebuild_tensor_v2", "safe"] in rows
    assert not any("UNSAFE" in r for r in rows)
    assert lines(result.stdout)[-1].endswith(", 0 unsafe")


def test_scan_unsafe_file_exits_1(tmp_path: Path) -> None:
    src, marker = make_malicious(tmp_path)
    result = cli_run("scan", src)
    no_traceback(result)
    assert result.exit_code == 1
    assert ["posix.system", "DANGEROUS"] in [line.split() for line in lines(result.stdout)]
    assert "1 unsafe (posix.system)" in result.stdout
    assert not marker.exists()


def test_scan_json(tmp_path: Path) -> None:
    src, _ = make_malicious(tmp_path)
    result = cli_run("scan", src, "--json")
    no_traceback(result)
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["source"] == str(src)
    assert report["format"] == "torch-zip"
    assert report["unsafe"] == ["posix.system"]
    assert {"name": "posix.system", "safe": False, "dangerous": True} in report["globals"]
    assert {
        "name": "torch._utils._rebuild_tensor_v2",
        "safe": True,
        "dangerous": False,
    } in report["globals"]

    result = cli_run("scan", make_flat_torch(tmp_path), "--json")
    assert_ok(result)
    assert json.loads(result.stdout)["unsafe"] == []


def test_scan_safetensors(tmp_path: Path) -> None:
    src = make_safetensors(tmp_path)
    result = cli_run("scan", src, "--json")
    assert_ok(result)
    report = json.loads(result.stdout)
    assert report["format"] == "safetensors"
    assert report["globals"] == []
    assert report["unsafe"] == []

    result = cli_run("scan", src)
    assert_ok(result)
    assert lines(result.stdout) == [f"{src}: safetensors, no pickle globals"]


# -- unreadable sources -----------------------------------------------------------------------


def truncated_torch(folder: Path) -> Path:
    data = make_flat_torch(folder, "whole.pt").read_bytes()
    path = folder / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    (folder / "whole.pt").unlink()
    return path


def truncated_safetensors(folder: Path) -> Path:
    data = make_safetensors(folder, "whole.safetensors").read_bytes()
    path = folder / "truncated.safetensors"
    path.write_bytes(data[:-5])
    (folder / "whole.safetensors").unlink()
    return path


def non_json_header(folder: Path) -> Path:
    path = folder / "garbage.safetensors"
    header = b"{this is not json}      "
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def empty_file(folder: Path) -> Path:
    path = folder / "empty.pt"
    path.write_bytes(b"")
    return path


def random_bytes(folder: Path) -> Path:
    path = folder / "noise.pth"
    path.write_bytes(bytes(range(256)) * 4)
    return path


def missing(folder: Path) -> Path:
    return folder / "missing.pt"


def a_folder(folder: Path) -> Path:
    path = folder / "ckpt_dir"
    path.mkdir()
    return path


BAD_SOURCES = {
    "missing": (missing, "does not exist"),
    "directory": (a_folder, "is a directory"),
    "truncated torch": (truncated_torch, "truncated"),
    "truncated safetensors": (truncated_safetensors, "truncated"),
    "non-JSON safetensors header": (non_json_header, "not JSON"),
    "empty": (empty_file, "empty"),
    "noise": (random_bytes, "not a recognised checkpoint"),
}


@pytest.mark.parametrize(
    ("command", "case"),
    [
        (command, case)
        for command in ("inspect", "inspect --json", "remap", "scan")
        for case in BAD_SOURCES
        # scan reads pickles only: a safetensors file, broken or not, has none to list
        if not (command == "scan" and "safetensors" in case)
    ],
)
def test_unreadable_source(tmp_path: Path, command: str, case: str) -> None:
    make, fragment = BAD_SOURCES[case]
    src = make(tmp_path)
    before = files_in(tmp_path)
    out = tmp_path / "out.safetensors"
    args: list[str | Path] = [*command.split(), src]
    if command == "remap":
        args += ["-o", out, "--strip-prefix", "a."]
    assert_error(cli_run(*args), "Error: ", fragment)
    assert not out.exists()
    assert files_in(tmp_path) == before  # no temporary file left behind either


# -- usage errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["inspect", "x.pt", "--bogus"], "--bogus"),
        (["remap", "x.pt", "--bogus"], "--bogus"),
        (["scan", "x.pt", "--bogus"], "--bogus"),
        (["frobnicate"], "frobnicate"),
        (["inspect"], "SRC"),
        (["remap", "x.pt", "--replace", "only-one"], "--replace"),
        (["remap", "x.pt", "--regex"], "--regex"),
    ],
)
def test_usage_errors_are_one_error_line(args: list[str], fragment: str) -> None:
    line = assert_error(cli_run(*args), fragment)
    assert "--help" in line


def test_version() -> None:
    result = cli_run("--version")
    assert_ok(result)
    assert result.stdout.startswith("ckptsurgery, version ")


# -- the MoCo done-when scenario --------------------------------------------------------------


def test_moco_backbone_end_to_end(tmp_path: Path) -> None:
    src = make_moco(tmp_path)
    src_bytes = src.read_bytes()
    out = tmp_path / "resnet50_backbone.safetensors"

    result = cli_run(
        "remap",
        src,
        "-o",
        out,
        "--keep",
        "module.encoder_q.*",
        "--drop",
        "module.encoder_q.fc.*",
        "--strip-prefix",
        "module.encoder_q.",
    )
    assert_ok(result)
    assert src.read_bytes() == src_bytes  # the source is never modified
    assert files_in(tmp_path) == {"moco_v2.pth.tar", "resnet50_backbone.safetensors"}
    assert "kept 7 of 22 keys (7 renamed), dropped 15" in result.stderr

    backbone = {k: v for k, v in encoder(1).items() if not k.startswith("fc.")}
    written = load_file(str(out))
    # The header lists the keys in source order; the data is laid out largest dtype first
    # (aligned, as the reference writer does), which is the order load_file returns.
    assert st_keys(out) == list(backbone)
    assert set(written) == set(backbone)
    source = torch.load(src, weights_only=True)["state_dict"]
    for name, t in written.items():
        want = source[f"module.encoder_q.{name}"]
        assert t.dtype == want.dtype, name
        assert t.shape == want.shape, name
        assert raw(t) == raw(want), name
    assert raw(written["bn1.weight"]) == raw(
        bits([0x7FC12345, 0x80000000, 0x7F800000], torch.float32)
    )

    for path in (src, out):
        result = cli_run("inspect", path)
        assert_ok(result)
    report = json.loads(cli_run("inspect", out, "--json").stdout)
    assert [t["key"] for t in report["tensors"]] == list(backbone)
    assert report["total_params"] == sum(t.numel() for t in backbone.values())


def test_scan_tells_unsafe_from_dangerous(tmp_path: Path) -> None:
    result = cli_run("scan", make_with_namespace(tmp_path))
    no_traceback(result)
    assert result.exit_code == 1
    assert ["argparse.Namespace", "unsafe"] in [line.split() for line in lines(result.stdout)]
    assert "--allow-global NAME" in result.stdout


def test_dangerous_global_is_not_recommended_for_allowlisting(tmp_path: Path) -> None:
    src, marker = make_malicious(tmp_path)
    result = cli_run("inspect", src)
    assert result.exit_code == 2
    assert "may be malicious" in result.stderr
    assert "Do not load it unless you trust its source" in result.stderr
    assert not marker.exists()
