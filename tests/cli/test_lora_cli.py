"""`ckptsurgery merge BASE --lora ADAPTER_DIR`: the fold against peft's merge_and_unload(), the
dry run's labels, the recipe round trip through `apply`, and the refusals (exit 2, no file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_close_state, assert_error, assert_ok, cli_run, peft_lora, tiny_bert
from safetensors import safe_open
from safetensors.torch import load_file

from ckptsurgery.keygroups import expand_group

peft = pytest.importorskip("peft", reason="peft is not installed (pip install '.[lora]')")
pytest.importorskip("transformers", reason="transformers is not installed")


@pytest.fixture
def case(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    model = tiny_bert()
    model.save_pretrained(tmp_path / "base")
    merged = peft_lora(
        model,
        tmp_path / "adapter",
        r=16,
        lora_alpha=32,
        target_modules=["query", "value", "intermediate.dense", "output.dense"],
        rank_pattern={"output.dense": 4},
        modules_to_save=["classifier"],
    )
    return tmp_path / "base" / "model.safetensors", tmp_path / "adapter", merged


def test_merge_lora_matches_peft(case: Any, tmp_path: Path) -> None:
    base, adapter, merged = case
    out = tmp_path / "out.safetensors"
    result = cli_run("merge", base, "--lora", adapter, "-o", out)
    assert_ok(result)
    assert_close_state(load_file(out), merged)
    assert "LoRA-folded" in result.stderr and "wrote 41 tensors" in result.stderr
    with safe_open(out, "pt") as f:
        lora = json.loads(f.metadata()["ckptsurgery.lora"])
    assert lora["r"] == 16 and lora["rank_pattern"] == {"output.dense": 4}


def test_dry_run_shows_the_fold_per_key_and_writes_nothing(case: Any, tmp_path: Path) -> None:
    base, adapter, _ = case
    out = tmp_path / "out.safetensors"
    result = cli_run("merge", base, "--lora", adapter, "-o", out, "--dry-run")
    assert_ok(result)
    assert not out.exists()
    rows = {  # each key of a grouped row (layer.{0, 1}.x) with that row
        key: line
        for line in result.stdout.splitlines()
        if line.startswith("#1 ")
        for key in expand_group(line.split("  ")[0].removeprefix("#1 ").strip())
    }
    assert "lora-fold r=16 scale=2.0" in rows["bert.encoder.layer.0.attention.self.query.weight"]
    assert "lora-fold r=4 scale=8.0" in rows["bert.encoder.layer.1.output.dense.weight"]
    assert " copy " in rows["bert.encoder.layer.0.attention.self.key.weight"]
    assert "base_model.model.classifier.weight" in result.stdout  # replaced by the adapter's
    assert "10 tensors LoRA-folded" in result.stderr


def test_json_names_the_adapter_as_a_source(case: Any, tmp_path: Path) -> None:
    base, adapter, _ = case
    result = cli_run("merge", base, "--lora", adapter, "--dry-run", "--json")
    assert_ok(result)
    data = json.loads(result.stdout)
    assert [Path(s["path"]).name for s in data["sources"]] == [
        "model.safetensors",
        "adapter_model.safetensors",
    ]
    folds = [e for e in data["plan"]["entries"] if e["op"] == "lora-fold"]
    assert len(folds) == 10 and folds[0]["kind"] == "linear" and len(folds[0]["sources"]) == 3


def test_emit_recipe_then_apply_writes_the_same_bytes(case: Any, tmp_path: Path) -> None:
    base, adapter, merged = case
    out = tmp_path / "out.safetensors"
    recipe = tmp_path / "fold.toml"
    assert_ok(cli_run("merge", base, "--lora", adapter, "-o", out, "--emit-recipe", recipe))
    text = recipe.read_text()
    assert f'[[lora]]\npath = "{adapter}"' in text
    again = tmp_path / "again.safetensors"
    recipe.write_text(text.replace(f'path = "{out}"', f'path = "{again}"'))
    result = cli_run("apply", recipe)
    assert_ok(result)
    assert_close_state(load_file(again), merged)
    assert load_file(again).keys() == load_file(out).keys()
    for k, v in load_file(out).items():
        assert torch.equal(v, load_file(again)[k])


def test_recipe_lora_with_a_missing_folder_is_reported(tmp_path: Path, case: Any) -> None:
    base, _, _ = case
    recipe = tmp_path / "bad.toml"
    recipe.write_text(
        f'[[source]]\npath = "{base}"\n\n[[lora]]\npath = "nowhere"\n\n'
        '[output]\npath = "out.safetensors"\n'
    )
    assert_error(
        cli_run("apply", recipe), "[lora] path", "'nowhere' does not exist", only_line=False
    )
    assert not (tmp_path / "out.safetensors").exists()


def test_dora_is_refused_with_one_error_line(tmp_path: Path) -> None:
    model = tiny_bert()
    model.save_pretrained(tmp_path / "base")
    peft_lora(model, tmp_path / "adapter", r=4, target_modules=["query"], use_dora=True)
    out = tmp_path / "out.safetensors"
    result = cli_run("merge", tmp_path / "base" / "model.safetensors", "--lora",
                     tmp_path / "adapter", "-o", out)  # fmt: skip
    assert_error(result, "DoRA (use_dora) is not supported")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_ia3_is_refused_with_one_error_line(tmp_path: Path) -> None:
    model = tiny_bert()
    model.save_pretrained(tmp_path / "base")
    config = peft.IA3Config(target_modules=["query", "value"], feedforward_modules=[])
    peft_lora(model, tmp_path / "adapter", peft_config=config)
    out = tmp_path / "out.safetensors"
    result = cli_run("merge", tmp_path / "base" / "model.safetensors", "--lora",
                     tmp_path / "adapter", "-o", out)  # fmt: skip
    assert_error(result, "peft_type 'IA3' is not supported", "only LORA adapters")
    assert not out.exists()


def test_lora_with_average_or_method_is_a_usage_error(case: Any, tmp_path: Path) -> None:
    base, adapter, _ = case
    result = cli_run("merge", base, base, "--average", "--lora", adapter, "-o", tmp_path / "o.pt")
    assert result.exit_code == 2
    assert "--lora does not apply with --average" in result.stderr
    result = cli_run("merge", "--method", "task-arithmetic", "--base", base, base, "--lora",
                     adapter, "-o", tmp_path / "o.pt")  # fmt: skip
    assert result.exit_code == 2
    assert "--lora does not apply with --method" in result.stderr


def test_output_equal_to_the_adapter_is_refused(case: Any) -> None:
    base, adapter, _ = case
    weights = adapter / "adapter_model.safetensors"
    before = weights.read_bytes()
    result = cli_run("merge", base, "--lora", adapter, "-o", weights, "--force")
    assert_error(result)
    assert weights.read_bytes() == before
