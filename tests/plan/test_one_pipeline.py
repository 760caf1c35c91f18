"""Every surgery builds a Plan from headers and runs the one executor: the dry run of each
command shows the plan (table and JSON) without reading a byte of tensor data, and every
refusal takes one shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from conftest import cli_run, garbage_data
from safetensors.torch import load_file, save_file

import ckptsurgery as cs
from ckptsurgery.keygroups import expand_group
from ckptsurgery.plan.build import build_plan
from ckptsurgery.plan.model import Plan

REFUSAL_KEYS = {"refused", "reason", "exit_code", "message", "problems", "report", "written"}


def backbone(prefix: str = "", *, seed: int = 0, head: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{prefix}conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        f"{prefix}bn.weight": torch.rand(4, generator=g),
        f"{prefix}bn.running_var": torch.rand(4, generator=g),
        f"{prefix}bn.num_batches_tracked": torch.tensor(5),
        f"{prefix}fc.weight": torch.randn(head, 4, generator=g),
        f"{prefix}fc.bias": torch.randn(head, generator=g),
    }


@pytest.fixture
def corrupt(tmp_path: Path) -> tuple[Path, Path]:
    """Two torch checkpoints whose tensor data is garbage behind a sound header."""
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(backbone("module.", seed=1), a)
    torch.save(backbone("module.", seed=2), b)
    return garbage_data(a), garbage_data(b)


def test_the_data_really_is_garbage(corrupt: tuple[Path, Path], tmp_path: Path) -> None:
    result = cli_run("remap", corrupt[0], "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 2 and "CRC" in result.stderr, result.output
    assert not (tmp_path / "o.safetensors").exists()


def test_remap_dry_run_plan_reads_no_data(corrupt: tuple[Path, Path], tmp_path: Path) -> None:
    args = ["remap", corrupt[0], "-o", tmp_path / "o.pt", "--strip-prefix", "module."]
    table = cli_run(*args, "--dtype", "bfloat16", "--dry-run")
    assert table.exit_code == 0, table.output
    rows = [line.split() for line in table.stdout.splitlines()]
    assert ["key", "new", "key", "op", "shape", "dtype", "bytes"] in rows
    assert rows[2][:5] == ["module.conv.weight", "->", "conv.weight", "cast", "->bfloat16"]
    assert "6 tensors, 340 B to write; 5 tensors cast to bfloat16 (332 B saved)" in table.stdout
    data = json.loads(cli_run(*args, "--dry-run", "--json").stdout)
    plan = data["plan"]
    assert plan["mode"] == "remap" and plan["tensors"] == 6
    assert plan["entries"][0] == {
        "key": "conv.weight",
        "shape": [4, 3, 3, 3],
        "dtype": "float32",
        "bytes": 432,
        "op": "copy",
        "sources": [{"source": 0, "key": "module.conv.weight"}],
    }
    assert plan["total_bytes"] == 432 + 16 + 16 + 8 + 160 + 40


def test_merge_dry_run_plans_read_no_data(corrupt: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = corrupt
    union = cli_run("merge", a, b, "--on-conflict", "last", "--dry-run")
    assert union.exit_code == 0, union.output
    assert "#2 module.fc.weight" in union.stdout and "key in several sources" in union.stdout
    data = json.loads(cli_run("merge", a, b, "--on-conflict", "last", "--dry-run", "--json").stdout)
    assert data["plan"]["mode"] == "union"
    assert {e["sources"][0]["source"] for e in data["plan"]["entries"]} == {1}
    avg = cli_run("merge", a, b, "--average", "--dtype", "float16", "--dry-run")
    assert avg.exit_code == 0, avg.output
    row = next(line.split() for line in avg.stdout.splitlines() if "module.conv.weight" in line)
    assert row[:7] == [
        "#1..#2",
        "module.conv.weight",
        "==",
        "module.conv.weight",
        "mean",
        "of",
        "2",
    ]
    data = json.loads(
        cli_run("merge", a, b, "--average", "--weights", "1", "3", "--dry-run", "--json").stdout
    )
    entry = data["plan"]["entries"][0]
    assert entry["op"] == "weighted-sum" and entry["weights"] == [0.25, 0.75]
    assert [s["source"] for s in entry["sources"]] == [0, 1]
    counter = next(e for e in data["plan"]["entries"] if e["key"].endswith("num_batches_tracked"))
    assert counter["op"] == "copy" and counter["sources"] == [{"source": 0, "key": counter["key"]}]


def test_apply_dry_run_plan_reads_no_data(corrupt: tuple[Path, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[[source]]\npath = "a.pt"\nstrip_prefix = ["module."]\ndrop = ["*.fc.*"]\n'
        '[[source]]\npath = "b.pt"\nkeep = ["module.fc.*"]\nstrip_prefix = ["module."]\n'
        '[output]\npath = "o.safetensors"\ndtype = "bfloat16"\nkeep_dtype = ["bn.*"]\n'
    )
    result = cli_run("apply", recipe, "--dry-run")
    assert result.exit_code == 0, result.output
    rows = {}  # each output key (of a grouped row too) -> that row's cells
    for line in result.stdout.splitlines():
        if " -> " in line:
            cells = [c.strip() for c in line.split("  ") if c.strip()]
            rows.update(dict.fromkeys(expand_group(cells[2]), cells))
    assert rows["fc.bias"][:4] == ["#2 module.fc.bias", "->", "fc.bias", "cast ->bfloat16"]
    assert rows["bn.weight"][0].startswith("#1 module.bn.") and rows["bn.weight"][3] == "copy"
    data = json.loads(cli_run("apply", recipe, "--dry-run", "--json").stdout)
    assert data["plan"]["dtype"] == "bfloat16" and data["plan"]["keep_dtype"] == ["bn.*"]
    assert [e["key"] for e in data["plan"]["entries"]][-2:] == ["fc.weight", "fc.bias"]


def test_train_weights_dry_run_plan_reads_no_data(tmp_path: Path) -> None:
    from ckptsurgery.train.heads import find_head
    from ckptsurgery.train.loading import load_weights

    model = torch.nn.Sequential()
    model.add_module("conv", torch.nn.Conv2d(3, 4, 3, bias=False))
    model.add_module("bn", torch.nn.BatchNorm2d(4))
    model.add_module("fc", torch.nn.Linear(4, 3))
    head = find_head(model, "fc")
    path = tmp_path / "w.pt"
    sd = backbone("module.")
    sd["module.bn.bias"] = torch.zeros(4)
    sd["module.bn.running_mean"] = torch.zeros(4)
    torch.save(sd, path)
    garbage_data(path)
    rules = cs.Rules(strip_prefix=("module.",))
    result = load_weights(model, head, str(path), rules=rules, dry_run=True)
    assert result.report.compatible and result.dropped_head == ("fc.weight", "fc.bias")
    assert "fc.weight" not in result.plan.names and result.state_dict == {}
    with pytest.raises(cs.FormatError, match="CRC"):
        load_weights(model, head, str(path), rules=rules)


# --- the plan as a value ------------------------------------------------------------------------


def test_a_plan_is_built_from_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptsurgery.io.safetensors_format import SafetensorsCheckpoint

    def boom(*_: Any, **__: Any) -> Any:
        raise AssertionError("tensor data was read")

    path = tmp_path / "m.safetensors"
    save_file(backbone(), str(path))
    for name in ("raw_bytes", "tensor", "write_data", "data_crc"):
        monkeypatch.setattr(SafetensorsCheckpoint, name, boom)
    with cs.open_checkpoint(path) as ckpt:
        plan = build_plan(
            [ckpt],
            [cs.Rules(drop=("fc.*",))],
            mode="remap",
            dtype="float16",
            keep_dtype=["bn.running_*"],
        )
    assert isinstance(plan, Plan)
    ops = {e.name: e.op.name for e in plan.entries}
    assert ops == {
        "conv.weight": "cast",
        "bn.weight": "cast",
        "bn.running_var": "copy",
        "bn.num_batches_tracked": "copy",
    }
    assert sorted(plan.dropped) == ["fc.bias", "fc.weight"]
    assert plan.total_bytes == 216 + 8 + 16 + 8 and plan.bytes_saved == 216 + 8


# --- one refusal shape -----------------------------------------------------------------------


def refusal_of(result: Result, exit_code: int) -> dict[str, Any]:
    assert result.exit_code == exit_code, result.output
    data = json.loads(result.stdout)
    assert set(data) >= REFUSAL_KEYS and data["refused"] is True and data["written"] is False
    assert data["exit_code"] == exit_code
    return data


def test_every_refusal_has_one_json_shape(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    del torchvision
    a = tmp_path / "a.safetensors"
    save_file(backbone(), str(a))
    b = tmp_path / "b.safetensors"
    save_file(backbone(seed=3), str(b))
    out = tmp_path / "o.safetensors"
    # the gate: missing / unexpected / shape mismatch, from remap, merge and apply alike
    gate = ["--model", "torchvision:resnet18", "--json"]
    r = refusal_of(cli_run("remap", a, "-o", out, *gate), 1)
    assert r["reason"] == "incompatible" and r["command"] == "remap"
    kinds = {p["kind"] for p in r["problems"]}
    assert kinds == {"missing", "unexpected", "shape_mismatch"}
    assert r["report"]["compatible"] is False
    m = refusal_of(cli_run("merge", a, "-o", out, *gate), 1)
    assert m["problems"] == r["problems"] and m["command"] == "merge"
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[[source]]\npath = "a.safetensors"\n[target]\nmodel = "torchvision:resnet18"\n[output]\npath = "o.safetensors"\n'
    )
    ap = refusal_of(cli_run("apply", recipe, "--json"), 1)
    assert ap["problems"] == r["problems"] and ap["command"] == "apply"
    # a merge conflict, an unsafe pickle, a collision: exit 2, same shape, one Error: line
    c = refusal_of(cli_run("merge", a, b, "-o", out, "--json"), 2)
    assert c["reason"] == "conflict" and c["report"] is None
    assert {"kind": "conflict", "key": "fc.bias", "sources": [str(a), str(b)]} in c["problems"]
    collide = refusal_of(cli_run("remap", a, "-o", out, "--regex", ".*", "x", "--json"), 2)
    assert collide["reason"] == "collision" and collide["problems"][0]["kind"] == "collision"
    import argparse

    unsafe = tmp_path / "u.pt"
    torch.save({"w": torch.zeros(1), "args": argparse.Namespace(lr=1)}, unsafe)
    u = refusal_of(cli_run("remap", unsafe, "-o", out, "--json"), 2)
    assert u["reason"] == "unsafe"
    assert u["problems"] == [{"kind": "unsafe_global", "key": "argparse.Namespace"}]
    for command in (("inspect", unsafe), ("diff", unsafe, "--against", a)):
        same = refusal_of(cli_run(*command, "--json"), 2)
        assert same["problems"] == u["problems"] and same["command"] == command[0]
    for result in (cli_run("merge", a, b, "-o", out), cli_run("remap", unsafe, "-o", out)):
        assert result.exit_code == 2 and result.stdout == ""
        assert [
            line for line in result.stderr.splitlines() if line.startswith("Error: ")
        ] == result.stderr.splitlines()[-1:]
    assert not out.exists()


# --- recipes of runs, applied ---------------------------------------------------------------


def test_emitted_recipe_of_a_remap_with_dtype_reproduces_it(tmp_path: Path) -> None:
    src = tmp_path / "in.pt"
    torch.save(backbone("module."), src)
    out = tmp_path / "out.safetensors"
    recipe = tmp_path / "recipes" / "r.toml"
    recipe.parent.mkdir()
    args = ["remap", src, "-o", out, "--strip-prefix", "module.", "--drop", "*.fc.*",
            "--dtype", "bfloat16", "--keep-dtype", "*.running_*", "--emit-recipe", recipe]  # fmt: skip
    dry = cli_run(*args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert recipe.is_file() and not out.exists()  # a dry run writes the recipe only
    text = recipe.read_text()
    assert 'dtype = "bfloat16"' in text and "keep_dtype" in text and "in.pt" in text
    recipe.unlink()
    assert cli_run(*args).exit_code == 0
    first = load_file(str(out))
    out.unlink()
    result = cli_run("apply", recipe)
    assert result.exit_code == 0, result.output
    again = load_file(str(out))
    assert list(again) == list(first)
    for k, v in first.items():
        assert again[k].dtype == v.dtype
        assert (
            again[k].reshape(-1).view(torch.uint8).tolist()
            == v.reshape(-1).view(torch.uint8).tolist()
        )
    assert again["bn.running_var"].dtype == torch.float32
    assert again["conv.weight"].dtype == torch.bfloat16


def test_emitted_recipe_of_an_average_reproduces_it(tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"r{i}.safetensors")
        save_file(backbone(seed=i), str(paths[-1]))
    out = tmp_path / "soup.safetensors"
    args = ["merge", *paths, "--average", "--weights", "1", "2", "1", "-o", out,
            "--dtype", "float16", "--emit-recipe", tmp_path / "soup.toml"]  # fmt: skip
    assert cli_run(*args).exit_code == 0
    first = load_file(str(out))
    out.unlink()
    assert cli_run("apply", tmp_path / "soup.toml").exit_code == 0
    again = load_file(str(out))
    for k, v in first.items():
        assert again[k].dtype == v.dtype and torch.equal(
            again[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)
        )


def test_emit_recipe_refuses_an_existing_file_before_any_work(tmp_path: Path) -> None:
    src = tmp_path / "in.safetensors"
    save_file(backbone(), str(src))
    recipe = tmp_path / "r.toml"
    recipe.write_text("keep me")
    result = cli_run("remap", src, "-o", tmp_path / "o.safetensors", "--emit-recipe", recipe)
    assert result.exit_code == 2 and "exists" in result.stderr
    assert recipe.read_text() == "keep me" and not (tmp_path / "o.safetensors").exists()
