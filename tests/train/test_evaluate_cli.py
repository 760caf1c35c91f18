"""`ckptsurgery evaluate`: loss, top-1 and top-5 of a checkpoint, with exact counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import Result
from conftest import cli_run
from safetensors.torch import save_file
from test_train_support import make_images, write_tiny_nets

from ckptsurgery.models import build_model
from ckptsurgery.train import TransformConfig, evaluate


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_tiny_nets(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def checkpoint(folder: Path, num_classes: int) -> Path:
    torch.manual_seed(0)
    model = build_model("tinynets:TinyCNN", {"num_classes": num_classes}, device="cpu").module
    path = folder / f"model{num_classes}.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def invoke(*args: str) -> Result:
    return cli_run("evaluate", "--model", "tinynets:TinyCNN", "--image-size", "16", *args)


def test_json_has_the_contract_keys_and_top5_with_more_than_5_classes(folder: Path) -> None:
    make_images(folder / "data", classes=6, per_class={"train": 1, "val": 2, "test": 3})
    weights = checkpoint(folder, 6)
    result = invoke("--weights", str(weights), "--data", "data", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) == {"loss", "top1", "top5", "samples"}
    assert payload["samples"] == 18  # test/ is preferred over val/
    assert 0 <= payload["top1"] <= payload["top5"] <= 1


def test_no_top5_with_few_classes_and_the_folder_itself(folder: Path) -> None:
    make_images(folder / "flat", classes=3, per_class={"": 2})
    weights = checkpoint(folder, 3)
    result = invoke("--weights", str(weights), "--data", "flat/")
    assert result.exit_code == 0, result.output
    assert "top5" in result.stdout and "samples" in result.stdout
    metrics = evaluate(
        "tinynets:TinyCNN", weights, folder / "flat", transform=TransformConfig(image_size=16)
    ).metrics
    assert metrics.top5 is None and metrics.samples == 6
    # The loss is the exact mean over samples: recompute it by hand.
    model = build_model("tinynets:TinyCNN", {"num_classes": 3}, device="cpu").module
    model.load_state_dict(_sd(weights))
    model.eval()
    from ckptsurgery.train.data import build_transform, image_folder

    data = image_folder(
        folder / "flat", build_transform(TransformConfig(image_size=16), train=False)
    )
    xs = torch.stack([data[i][0] for i in range(len(data))])
    ys = torch.tensor([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(xs), ys)
    assert metrics.loss == pytest.approx(float(loss), rel=1e-5)


def _sd(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_head_for_another_class_count_exits_1(folder: Path) -> None:
    make_images(folder / "data", classes=3, per_class={"val": 1})
    weights = checkpoint(folder, 10)
    result = invoke("--weights", str(weights), "--data", "data")
    assert result.exit_code == 1, result.output
    assert "shape mismatch" in result.stdout
    # a gate's refusal, said as every command says it: the last line, no "Error:"
    last = result.stderr.splitlines()[-1]
    assert "has 3 classes" in last and last.endswith("nothing written")
    assert not any(line.startswith("Error:") for line in result.stderr.splitlines())
    as_json = invoke("--weights", str(weights), "--data", "data", "--json")
    refusal = json.loads(as_json.stdout)
    assert as_json.exit_code == 1 and refusal["reason"] == "incompatible"
    assert refusal["command"] == "evaluate" and refusal["weights"] == str(weights)
    assert {p["kind"] for p in refusal["problems"]} == {"shape_mismatch"}


def test_bad_inputs_exit_2(folder: Path) -> None:
    make_images(folder / "data", classes=3, per_class={"val": 1})
    missing = invoke("--weights", "nope.safetensors", "--data", "data")
    assert missing.exit_code == 2 and missing.stderr.startswith("Error: ")
    weights = checkpoint(folder, 3)
    no_data = invoke("--weights", str(weights), "--data", "nowhere")
    assert no_data.exit_code == 2
    assert no_data.stderr.strip() == "Error: data folder 'nowhere' does not exist"


def test_fmt_lays_out_the_metrics_and_the_report(folder: Path) -> None:
    make_images(folder / "data", classes=3, per_class={"val": 1})
    result = invoke("--weights", str(checkpoint(folder, 3)), "--data", "data", "--fmt", "github")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["|", "metric", "|", "value", "|"]
    assert lines[1].startswith("|---") and lines[-1].startswith("| samples ")
    result = invoke("--weights", str(checkpoint(folder, 10)), "--data", "data", "--fmt", "grid")
    assert result.exit_code == 1, result.output
    assert "shape mismatch (2):\n  +---" in result.stdout  # the refused report's table
