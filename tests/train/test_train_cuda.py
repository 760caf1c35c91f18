"""The trainer's CUDA paths (device placement, AMP, saving from the GPU); skipped without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cli_run
from safetensors.torch import load_file
from test_train_support import BASE, training_folder

from ckptsurgery.models import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return training_folder(tmp_path, monkeypatch)


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("mode", ["linear-probe", "discriminative"])
def test_train_and_evaluate_on_cuda(folder: Path, mode: str, amp: bool) -> None:
    args = [*BASE, "-o", "run", "--mode", mode, "--epochs", "2", "--device", "cuda"]
    result = cli_run("train", *args, *(["--amp"] if amp else []))
    assert result.exit_code == 0, result.output
    best = load_file(str(folder / "run" / "best.safetensors"))
    assert all(t.device.type == "cpu" for t in best.values())  # saved from the GPU to the CPU
    fresh = build_model("tinynets:TinyCNN", {"num_classes": 3}, device="cpu").module
    fresh.load_state_dict(best, strict=True)
    metrics = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").open()]
    assert len(metrics) == 2 and all(0.0 <= m["top1"] <= 1.0 for m in metrics)

    result = cli_run(
        "evaluate", "--model", "tinynets:TinyCNN", "--weights", "run/best.safetensors",
        "--data", "data", "--image-size", "16", "--device", "cuda", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["samples"] > 0 and 0.0 <= report["top1"] <= 1.0
