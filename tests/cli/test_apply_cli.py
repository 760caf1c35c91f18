"""`ckptsurgery apply RECIPE.toml` through CliRunner, on real files in tmp_path."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import assert_ok, cli_run, source_digest
from safetensors.torch import load_file, save_file


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


RECIPE = """
    # ckptsurgery apply moco_resnet18.toml
    [[source]]
    path = "ckpts/moco.pth.tar"
    keep = ["module.encoder_q.*"]
    drop = ["module.encoder_q.fc.*"]
    strip_prefix = ["module.encoder_q."]

    [[source]]
    path = "ckpts/head.safetensors"
    strip_prefix = ["classifier."]
    add_prefix = "fc."

    [target]
    model = "torchvision:resnet18"
    model_args = { num_classes = 10 }

    [output]
    path = "resnet18_moco.safetensors"
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    """A MoCo checkpoint (query and key encoders, an MLP-less fc) and a separate 10-class head."""
    (tmp_path / "ckpts").mkdir()
    net = torchvision.models.resnet18(num_classes=10)
    sd = net.state_dict()
    moco = {}
    for enc in ("encoder_q", "encoder_k"):
        for k, v in sd.items():
            moco[f"module.{enc}.{k}"] = (
                v if not k.startswith("fc.") else torch.zeros(128, *v.shape[1:])
            )
    torch.save(
        {"epoch": 200, "arch": "resnet18", "state_dict": moco}, tmp_path / "ckpts" / "moco.pth.tar"
    )
    save_file(
        {"classifier.weight": sd["fc.weight"].clone(), "classifier.bias": sd["fc.bias"].clone()},
        tmp_path / "ckpts" / "head.safetensors",
    )
    path = tmp_path / "moco_resnet18.toml"
    path.write_text(textwrap.dedent(RECIPE).lstrip(), encoding="utf-8")
    return path


def test_apply_writes_a_loadable_file_twice_the_same(recipe: Path, tmp_path: Path) -> None:
    result = cli_run("apply", recipe)
    assert_ok(result)
    assert result.stdout.startswith("matched 122 of 122")
    out = tmp_path / "resnet18_moco.safetensors"
    assert result.stderr.splitlines()[-1].startswith(
        "union of 2 sources: 122 tensors (moco.pth.tar 120, head.safetensors 2); fits the model; wrote 122 tensors"
    )
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(load_file(out), strict=True)
    first = out.read_bytes()

    again = cli_run("apply", recipe)
    assert again.exit_code == 2 and "--force" in again.stderr
    assert_ok(cli_run("apply", recipe, "--force"))
    assert out.read_bytes() == first


def test_apply_dry_run_prints_plans_merge_and_gate(recipe: Path, tmp_path: Path) -> None:
    before = files(tmp_path)
    result = cli_run("apply", recipe, "--dry-run")
    assert_ok(result)
    assert files(tmp_path) == before
    out = result.stdout
    assert "source 1: " in out and "module.encoder_q.conv1.weight" in out and "-> " in out
    assert "source 2: " in out and "classifier.weight" in out
    assert "--keep 'module.encoder_q.*'" in out  # the rule counts
    assert "matched 122 of 122" in out
    assert result.stderr.splitlines()[-1] == (
        "dry run: union of 2 sources: 122 tensors (moco.pth.tar 120, head.safetensors 2); "
        "fits the model; nothing written"
    )


def test_apply_gate_refuses(recipe: Path, tmp_path: Path) -> None:
    recipe.write_text(recipe.read_text().replace("num_classes = 10", "num_classes = 7"))
    dry = cli_run("apply", recipe, "--dry-run")
    assert dry.exit_code == 1
    assert "does NOT fit the model" in dry.stderr
    result = cli_run("apply", recipe)
    assert result.exit_code == 1
    assert "shape mismatch" in result.stdout
    assert "refusing to write" in result.stderr and "nothing written" in result.stderr
    assert not (tmp_path / "resnet18_moco.safetensors").exists()
    data = json.loads(cli_run("apply", recipe, "--json").stdout)
    assert data["written"] is False and data["report"]["compatible"] is False


def test_apply_json(recipe: Path) -> None:
    result = cli_run("apply", recipe, "--json")
    assert_ok(result)
    data = json.loads(result.stdout)
    assert data["recipe"] == str(recipe)
    assert data["written"] is True and data["tensors"] == 122
    assert data["report"]["compatible"] is True
    assert [s["kept"] for s in data["sources"]] == [120, 2]
    assert {"old": "classifier.weight", "new": "fc.weight"} in data["sources"][1]["renames"]


def test_apply_provenance_in_inspect(recipe: Path, tmp_path: Path) -> None:
    assert_ok(cli_run("apply", recipe))
    data = json.loads(cli_run("inspect", tmp_path / "resnet18_moco.safetensors", "--json").stdout)
    prov = data["provenance"]
    assert set(prov) >= {"version", "sources", "merge", "origin", "target", "recipe"}
    assert prov["sources"][0]["key"] == "state_dict"
    assert prov["sources"][0]["rules"]["strip_prefix"] == ["module.encoder_q."]
    assert prov["sources"][1]["rules"] == {"strip_prefix": ["classifier."], "add_prefix": "fc."}
    digest = next(iter(source_digest(Path(__file__))))  # the algorithm's name
    assert all(
        len(s[digest]) == len(source_digest(Path(__file__))[digest]) for s in prov["sources"]
    )
    assert prov["origin"][1]["keys"] == ["fc.{bias, weight}"]
    assert prov["recipe"]["name"] == "moco_resnet18.toml"
    assert prov["target"]["model_args"] == {"num_classes": 10}
    assert data["metadata"] == {"format": "pt"}  # provenance is not repeated as plain metadata


def test_apply_malformed_recipe_is_one_error_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[source]]\npath = "nope.pth"\nkeep = 3\n[merge]\non_conflict = "x"\n')
    result = cli_run("apply", bad)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {bad}: 4 problems: line 2: ")
    for fragment in ("nope.pth", "keep", "on_conflict", "[output]: missing"):
        assert fragment in lines[0]
    assert files(tmp_path) == ["bad.toml"]


def test_apply_missing_recipe(tmp_path: Path) -> None:
    result = cli_run("apply", tmp_path / "nope.toml")
    assert result.exit_code == 2
    assert "does not exist" in result.stderr
