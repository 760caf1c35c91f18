"""train --weights goes through the plan: its dry run shows the plan (table and JSON) without
reading tensor data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cli_run, garbage_data
from test_train_support import BASE, training_folder

from ckptsurgery.models import build_model


def test_train_cli_dry_run_shows_the_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    training_folder(tmp_path, monkeypatch)
    model = build_model("tinynets:TinyCNN", {"num_classes": 10}, device="cpu").module
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "w.pt")
    garbage_data(tmp_path / "w.pt")
    base = ["train", *BASE, "--mode", "full"]
    args = [*base, "-o", "run", "--weights", "w.pt", "--strip-prefix", "module.", "--dry-run"]
    result = cli_run(*args)
    assert result.exit_code == 0, result.output
    assert ["module.fc.weight"] not in [line.split()[:1] for line in result.stdout.splitlines()]
    assert any(
        line.split()[:4] == ["module.features.0.weight", "->", "features.0.weight", "copy"]
        for line in result.stdout.splitlines()
    )
    assert "plan: " in result.stderr and "to load" in result.stderr
    data = json.loads(cli_run(*args, "--json").stdout)
    assert data["plan"]["mode"] == "remap"
    assert "fc.weight" not in [e["key"] for e in data["plan"]["entries"]]
