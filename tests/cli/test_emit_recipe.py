"""From diagnosis to recipe: `diff --suggest --emit-recipe FILE`, then `apply FILE` unchanged."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli_run

MOCO = REPO / "fixtures" / "moco_tinynet.pth.tar"
MODEL = "fixtures.make_fixtures:tinynet"  # resolved from the current folder: the repo root

pytestmark = pytest.mark.usefixtures("in_repo_root")


def test_emitted_recipe_applies_unchanged(tmp_path: Path) -> None:
    recipe = tmp_path / "moco.toml"
    result = cli_run("diff", MOCO, "--model", MODEL, "--suggest", "--emit-recipe", recipe)
    assert result.exit_code == 1, result.output  # the checkpoint as it is does not fit
    assert f"wrote the suggested recipe to {recipe}" in result.stderr
    data = tomllib.loads(recipe.read_text())
    assert data["source"][0]["strip_prefix"] == ["module.encoder_q."]
    assert data["target"]["model"] == MODEL
    assert data["target"]["allow_missing"] == ["fc.*"]
    assert data["output"]["path"] == "moco_tinynet_remapped.safetensors"  # beside the recipe

    result = cli_run("apply", recipe)
    assert result.exit_code == 0, result.output
    out = tmp_path / "moco_tinynet_remapped.safetensors"
    result = cli_run("diff", out, "--model", MODEL, "--json")
    assert result.exit_code == 1
    import json

    report = json.loads(result.stdout)
    assert report["missing"] == ["fc.weight", "fc.bias"]
    assert report["unexpected"] == [] and report["shape_mismatch"] == []

    # Bit-exact: the written tensors are the query encoder's, renamed.
    from safetensors.torch import load_file

    source = torch.load(MOCO, weights_only=True)["state_dict"]
    for name, t in load_file(str(out)).items():
        original = source["module.encoder_q." + name]
        assert t.dtype == original.dtype and t.shape == original.shape
        assert bytes(t.reshape(-1).view(torch.uint8).numpy()) == bytes(
            original.contiguous().reshape(-1).view(torch.uint8).numpy()
        )


def test_existing_recipe_needs_force(tmp_path: Path) -> None:
    recipe = tmp_path / "moco.toml"
    recipe.write_text("# mine\n")
    result = cli_run("diff", MOCO, "--model", MODEL, "--suggest", "--emit-recipe", recipe)
    assert result.exit_code == 2
    assert result.stderr.startswith("Error:") and "--force" in result.stderr
    assert recipe.read_text() == "# mine\n"
    result = cli_run(
        "diff", MOCO, "--model", MODEL, "--suggest", "--emit-recipe", recipe, "--force"
    )
    assert result.exit_code == 1
    assert "[[source]]" in recipe.read_text()


def test_emit_recipe_needs_suggest(tmp_path: Path) -> None:
    result = cli_run("diff", MOCO, "--model", MODEL, "--emit-recipe", tmp_path / "r.toml")
    assert result.exit_code == 2
    assert "--suggest" in result.stderr
    assert not (tmp_path / "r.toml").exists()


def test_ambiguous_suggestion_writes_no_recipe(tmp_path: Path) -> None:
    dino = REPO / "fixtures" / "dino_tinynet.pth"
    flat = {
        f"{side}.{k}": v
        for side in ("student", "teacher")
        for k, v in torch.load(dino, weights_only=True)["teacher"].items()
    }
    src = tmp_path / "flat.pth"
    torch.save(flat, src)
    recipe = tmp_path / "r.toml"
    result = cli_run("diff", src, "--model", MODEL, "--suggest", "--emit-recipe", recipe)
    assert result.exit_code == 2
    assert "ambiguous" in result.stderr
    assert not recipe.exists()
