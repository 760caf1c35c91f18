"""The recipe's flags through ``ckptsurgery train``, the side-by-side table of raw, EMA and
averaged weights, ``curves.png`` and ``ckptsurgery plot``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import assert_error, assert_ok, cli_run
from test_train_support import BASE, training_folder

PNG = b"\x89PNG\r\n\x1a\n"
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="the plot extra is not installed"
)


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return training_folder(tmp_path, monkeypatch)


RECIPE = [
    "--mode", "full", "--epochs", "3", "--ema", "0.9", "--no-ema-warmup", "--clip-grad", "2",
    "--accum-steps", "2", "--label-smoothing", "0.1", "--mixup", "0.2", "--cutmix", "0.5",
    "--mix-prob", "0.8", "--keep-top-k", "2", "--average-top-k", "--amp", "bf16",
    "--channels-last", "--device", "cpu",
]  # fmt: skip


def test_recipe_flags_reach_the_run_and_the_table_compares_the_weights(folder: Path) -> None:
    result = cli_run("train", *BASE, "-o", "run", *RECIPE)
    assert_ok(result)
    config = json.loads((folder / "run" / "config.json").read_text())
    expected = {
        "ema": 0.9,
        "ema_warmup": False,
        "clip_grad": 2.0,
        "accum_steps": 2,
        "label_smoothing": 0.1,
        "mixup": 0.2,
        "cutmix": 0.5,
        "mix_prob": 0.8,
        "keep_top_k": 2,
        "average_top_k": True,
        "amp": "bf16",
        "channels_last": True,
        "compile": False,
    }
    assert {k: config[k] for k in expected} == expected
    # 12 training images in batches of 4, two batches a step: 2 optimizer steps an epoch.
    assert config["derived"]["train_images"] == 12
    for name in ("ema.safetensors", "averaged.safetensors", "averaged.json"):
        assert (folder / "run" / name).is_file()
    assert len(list((folder / "run" / "top_k").iterdir())) == 2
    table = result.stdout.split("weights")[-1]
    for row in ("raw, last (epoch 3)", "raw, best", "EMA (epoch 3)", "averaged (epochs"):
        assert row in table
    assert "EMA val loss" in result.stderr  # the epoch lines


def test_json_reports_the_averaged_weights(folder: Path) -> None:
    result = cli_run(
        "train", *BASE, "-o", "run", "--mode", "full", "--epochs", "2", "--keep-top-k", "2",
        "--average-top-k", "--json",
    )  # fmt: skip
    assert_ok(result)
    out = json.loads(result.stdout)
    assert sorted(out["averaged"]["epochs"]) == [1, 2]
    assert out["averaged"] == json.loads((folder / "run" / "averaged.json").read_text())


def test_force_replaces_every_output_of_the_recipe(folder: Path) -> None:
    args = [*BASE, "-o", "run", "--mode", "full", "--epochs", "2", "--keep-top-k", "1"]
    assert_ok(cli_run("train", *args))
    assert_error(cli_run("train", *BASE, "-o", "run", "--mode", "full"), "--force")
    (folder / "run" / "top_k" / "epoch-099.safetensors").write_bytes(b"stale")
    assert_ok(cli_run("train", *BASE, "-o", "run", "--mode", "full", "--epochs", "1", "--force"))
    assert not (folder / "run" / "top_k").exists()  # the earlier run's kept checkpoints too


def test_bad_recipe_values_are_one_error_line(folder: Path) -> None:
    assert_error(cli_run("train", *BASE, "-o", "r", "--mode", "full", "--ema", "1.5"), "--ema")
    assert_error(
        cli_run("train", *BASE, "-o", "r", "--mode", "full", "--average-top-k"), "--keep-top-k"
    )
    assert not (folder / "r").exists()


@needs_matplotlib
def test_training_draws_curves_and_plot_draws_them_again(folder: Path) -> None:
    assert_ok(
        cli_run("train", *BASE, "-o", "run", "--mode", "full", "--epochs", "2", "--ema", "0.5")
    )
    curves = folder / "run" / "curves.png"
    assert curves.read_bytes().startswith(PNG)
    curves.unlink()
    result = cli_run("plot", "run")
    assert_ok(result)
    assert curves.read_bytes().startswith(PNG)
    assert_ok(cli_run("plot", "run", "-o", folder / "elsewhere.png"))
    assert (folder / "elsewhere.png").read_bytes().startswith(PNG)


def test_plot_needs_a_training_run(folder: Path) -> None:
    assert_error(cli_run("plot", "data"), "metrics.jsonl")
    assert not (folder / "data" / "curves.png").exists()
