"""`ckptsurgery train` through the CLI: reports, tables, exit codes and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import Result
from conftest import cli_run
from safetensors.torch import load_file, save_file
from test_train_support import BASE, make_images, training_folder

from ckptsurgery.models import build_model


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return training_folder(tmp_path, monkeypatch)


def invoke(*args: str) -> Result:
    return cli_run("train", *args)


def one_line_error(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


def pretrained(folder: Path, *, prefix: str = "", num_classes: int = 10) -> Path:
    torch.manual_seed(5)
    model = build_model("tinynets:TinyCNN", {"num_classes": num_classes}, device="cpu").module
    path = folder / "pretrained.safetensors"
    save_file({prefix + k: v for k, v in model.state_dict().items()}, str(path))
    return path


def test_full_run_writes_the_outputs_and_prints_tables(folder: Path) -> None:
    result = invoke(*BASE, "-o", "run", "--mode", "full", "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert "group" in result.stdout and "weight decay" in result.stdout
    assert "epoch" in result.stdout and "top1" in result.stdout
    assert "head: fc (Linear 8 -> 10; found by its name 'fc')" in result.stderr
    assert "epoch 1/2: train loss" in result.stderr  # plain lines: not a terminal
    assert "from scratch" in result.stderr
    out = folder / "run"
    for name in ("last.safetensors", "best.safetensors", "last_state.pt", "config.json"):
        assert (out / name).is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    fresh = build_model("tinynets:TinyCNN", {"num_classes": 3}, device="cpu").module
    fresh.load_state_dict(load_file(str(out / "best.safetensors")), strict=True)


def test_dry_run_prints_the_report_and_groups_and_writes_nothing(folder: Path) -> None:
    weights = pretrained(folder)
    result = invoke(
        *BASE, "-o", "run", "--mode", "discriminative", "--weights", str(weights), "--dry-run"
    )
    assert result.exit_code == 0, result.output
    assert "dropped for their shape" in result.stdout  # the 10-class head
    assert "-> compatible" in result.stdout
    lines = result.stdout.splitlines()
    backbone = next(line for line in lines if line.startswith("backbone"))
    head = next(line for line in lines if line.startswith("head"))
    assert backbone.split()[3] == "0.01" and head.split()[3] == "0.1"
    assert "nothing written" in result.stderr
    assert not (folder / "run").exists()


def test_json_output(folder: Path) -> None:
    result = invoke(*BASE, "-o", "run", "--mode", "linear-probe", "--json", "--lr", "0.1")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["head"] == "fc" and payload["classes"] == ["c0", "c1", "c2"]
    assert [g["group"] for g in payload["groups"]] == ["head"]
    assert payload["groups"][0]["tensors"] == 2
    assert payload["best"]["epoch"] == payload["best_epoch"]


def test_weights_through_rule_flags(folder: Path) -> None:
    weights = pretrained(folder, prefix="module.")
    result = invoke(
        *BASE,
        "-o",
        "run",
        "--mode",
        "linear-probe",
        "--weights",
        str(weights),
        "--strip-prefix",
        "module.",
        "--epochs",
        "1",
        "--progress",
    )
    assert result.exit_code == 0, result.output
    last = load_file(str(folder / "run" / "last.safetensors"))
    src = load_file(str(weights))
    assert torch.equal(last["features.0.weight"], src["module.features.0.weight"])
    assert "bit-identical" in result.stderr
    assert "epoch 1/1: " in result.stderr and "step/s" in result.stderr  # the bar, forced on


def test_weights_that_do_not_fit_exit_1_with_the_report(folder: Path) -> None:
    sd = load_file(str(pretrained(folder)))
    del sd["features.0.weight"]
    save_file(sd, str(folder / "partial.safetensors"))
    args = [*BASE, "-o", "run", "--mode", "full", "--weights", "partial.safetensors"]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "missing: in the model, not in the checkpoint" in result.stdout
    assert "features.0.weight" in result.stdout
    assert "INCOMPATIBLE" in result.stdout
    # a refusal by the gate (exit 1) is said as remap's is: its last line, no "Error:"
    assert "--allow-missing" in result.stderr.splitlines()[-1]
    assert result.stderr.splitlines()[-1].endswith("nothing written")
    assert not (folder / "run").exists()
    allowed = invoke(*args, "--allow-missing", "features.0.weight", "--epochs", "1")
    assert allowed.exit_code == 0, allowed.output


def test_a_backbone_shape_mismatch_is_not_dropped(folder: Path) -> None:
    sd = load_file(str(pretrained(folder)))
    sd["features.0.bias"] = torch.zeros(5)
    save_file(sd, str(folder / "bad.safetensors"))
    result = invoke(*BASE, "-o", "run", "--mode", "full", "--weights", "bad.safetensors")
    assert result.exit_code == 1, result.output
    assert "shape mismatch (1)" in result.stdout
    assert "features.0.bias" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["--data", "nowhere"], "data folder 'nowhere' does not exist"),
        ("empty", ["--data", "empty"], "has no 'train' folder"),
        ("noclasses", ["--data", "noclasses"], "holds no class folders"),
        ("oneclass", ["--data", "oneclass"], "holds one class"),
        ("noval", ["--data", "noval"], "has no 'val' or 'test' folder"),
        ("differ", ["--data", "differ"], "hold different classes"),
        (None, ["--weights", "missing.pt"], "missing.pt"),
        (None, ["--amp", "--device", "cpu"], "--amp"),
        (None, ["--head", "nohead"], "--head 'nohead'"),
        (None, ["--mean", "1,2"], "--mean needs 1 or 3 values"),
        (None, ["--mean", "a,b"], "comma-separated"),
        (None, ["--warmup-epochs", "10"], "--warmup-epochs"),
        (None, ["--resume"], "holds no last_state.pt"),
        (None, ["--bn", "recalibrate", "--mode", "linear-probe"], "frozen backbone"),
        (None, ["--model-arg", "num_classes"], "--model-arg"),
    ],
)
def test_bad_inputs_exit_2_with_one_error_line(
    folder: Path, setup: str | None, args: list[str], message: str
) -> None:
    if setup == "empty":
        (folder / "empty").mkdir()
    elif setup == "noclasses":
        (folder / "noclasses" / "train").mkdir(parents=True)
    elif setup == "oneclass":
        make_images(folder / "oneclass", classes=1)
    elif setup == "noval":
        make_images(folder / "noval", per_class={"train": 1})
    elif setup == "differ":
        make_images(folder / "differ", classes=3, per_class={"train": 1})
        make_images(folder / "differ", classes=2, per_class={"val": 1})
    mode = [] if "--mode" in args else ["--mode", "full"]
    result = invoke(*BASE, "-o", "run", *mode, *args)
    assert result.exit_code == 2, result.output
    assert message in one_line_error(result)
    assert not (folder / "run").exists()


def test_an_earlier_run_is_kept_unless_forced(folder: Path) -> None:
    args = [*BASE, "-o", "run", "--mode", "full", "--epochs", "1"]
    assert invoke(*args).exit_code == 0
    again = invoke(*args)
    assert again.exit_code == 2
    assert "--resume" in one_line_error(again) and "--force" in one_line_error(again)
    forced = invoke(*args, "--force")
    assert forced.exit_code == 0, forced.output
    resumed = invoke(*args, "--resume")  # already complete: nothing left to do, still checks
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.stderr


def test_output_is_required_except_for_a_dry_run(folder: Path) -> None:
    result = invoke(*BASE, "--mode", "full")
    assert result.exit_code == 2
    assert "--output" in one_line_error(result)
    assert invoke(*BASE, "--mode", "full", "--dry-run").exit_code == 0


def test_fmt_lays_out_the_report_and_the_group_table(folder: Path) -> None:
    weights = pretrained(folder)
    args = ("-o", "run", "--mode", "discriminative", "--weights", str(weights), "--dry-run")
    result = invoke(*BASE, *args, "--fmt", "github")
    assert result.exit_code == 0, result.output
    assert "dropped for their shape (now missing) (2):\n  | key " in result.stdout
    lines = result.stdout.splitlines()
    assert any(line.startswith("| group ") for line in lines)
    assert any(line.startswith("| backbone ") for line in lines)


def test_epochs_table_formats() -> None:
    from ckptsurgery.cli.train_cmd import epochs_table

    row = {"epoch": 1, "train_loss": 0.5, "val_loss": None, "top1": 0.25, "top5": None}
    metrics = [{**row, "seconds": 1.25, "best": True}]
    cells = ["1", "0.5000", "-", "0.2500", "-", "1.2", "*"]
    assert epochs_table(metrics).splitlines()[2].split() == cells
    github = epochs_table(metrics, fmt="github").splitlines()
    assert github[0].startswith("| epoch ") and github[1].startswith("|-")
    assert [c.strip() for c in github[2].split("|")[1:-1]] == cells
