"""The gate: ``remap ... --model SPEC`` writes only what fits the model; ``cs.remap(gate=...)``
and ``load_into`` refuse the same way in Python, and leave files and models untouched."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from conftest import cli_run_clean, raw
from safetensors.torch import load_file

import ckptsurgery as cs
from ckptsurgery.loading import load_into
from ckptsurgery.match import MatchReport
from ckptsurgery.models import build_model
from ckptsurgery.surgery import Gate

torchvision = pytest.importorskip("torchvision")

R18 = ("--model", "torchvision:resnet18")

# -- helpers ----------------------------------------------------------------------------------


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def assert_refused(result: Result, folder: Path, before: set[str]) -> None:
    """Exit 1, the report on stdout, why on stderr, and no file (not even a temporary one)."""
    assert result.exit_code == 1, result.output
    assert "-> INCOMPATIBLE" in result.stdout
    assert "nothing written" in result.stderr
    assert not any(line.startswith("Error:") for line in result.stderr.splitlines())
    assert files(folder) == before


def assert_written(out: Path, source: Mapping[str, torch.Tensor], names: Mapping[str, str]) -> None:
    """``out`` holds exactly ``names`` (new -> old), each bit-exact from ``source``."""
    written = load_file(str(out))
    assert set(written) == set(names)
    for new, old in names.items():
        assert written[new].dtype == source[old].dtype, new
        assert raw(written[new]) == raw(source[old]), new


@pytest.fixture(scope="module")
def r18() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.fixture(scope="module")
def r18_10() -> dict[str, torch.Tensor]:
    """A resnet18 fine-tuned for 10 classes: the same backbone, a 10-class head."""
    torch.manual_seed(1)
    return torchvision.models.resnet18(weights=None, num_classes=10).state_dict()


@pytest.fixture
def dp(tmp_path: Path, r18: dict[str, torch.Tensor]) -> tuple[Path, dict[str, torch.Tensor]]:
    """A DataParallel checkpoint: every key prefixed with ``module.``."""
    sd = {"module." + k: v for k, v in r18.items()}
    torch.save(sd, tmp_path / "dp.pth")
    return tmp_path / "dp.pth", sd


# -- the CLI gate -----------------------------------------------------------------------------


def test_refuses_when_nothing_matches(tmp_path: Path, dp: tuple[Path, Any]) -> None:
    src, _ = dp
    before = files(tmp_path)
    result = cli_run_clean("remap", src, "-o", tmp_path / "out.safetensors", *R18)
    assert_refused(result, tmp_path, before)
    assert "missing: in the model, not in the checkpoint (122):" in result.stdout
    assert "unexpected: in the checkpoint, not in the model (122):" in result.stdout
    assert "refusing to write" in result.stderr


def test_writes_when_the_rules_make_it_fit(
    tmp_path: Path, dp: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    src, sd = dp
    out = tmp_path / "out.safetensors"
    result = cli_run_clean("remap", src, "-o", out, "--strip-prefix", "module.", *R18)
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip().endswith("-> compatible")
    assert_written(out, sd, {k.removeprefix("module."): k for k in sd})
    assert files(tmp_path) == {"dp.pth", "out.safetensors"}


def test_refusal_leaves_an_existing_output_alone(
    tmp_path: Path, dp: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    src, _ = dp
    out = tmp_path / "out.pt"
    out.write_bytes(b"previous")
    result = cli_run_clean("remap", src, "-o", out, "--force", *R18)
    assert_refused(result, tmp_path, {"dp.pth", "out.pt"})
    assert out.read_bytes() == b"previous"


def test_allow_missing_lets_a_backbone_through(
    tmp_path: Path, r18: dict[str, torch.Tensor]
) -> None:
    backbone = {k: v for k, v in r18.items() if not k.startswith("fc.")}
    torch.save(backbone, src := tmp_path / "backbone.pth")
    out = tmp_path / "out.safetensors"
    before = files(tmp_path)
    assert_refused(cli_run_clean("remap", src, "-o", out, *R18), tmp_path, before)

    # A glob that allows something else does not help.
    result = cli_run_clean("remap", src, "-o", out, *R18, "--allow-missing", "head.*")
    assert_refused(result, tmp_path, before)

    result = cli_run_clean("remap", src, "-o", out, *R18, "--allow-missing", "fc.*")
    assert result.exit_code == 0, result.output
    assert "fc.{bias, weight}  (allowed)" in result.stdout
    assert_written(out, backbone, {k: k for k in backbone})


def test_allow_unexpected_keeps_the_extra_keys(
    tmp_path: Path, r18: dict[str, torch.Tensor]
) -> None:
    sd = {**r18, "queue": torch.randn(4, 8)}
    torch.save(sd, src := tmp_path / "extra.pth")
    out = tmp_path / "out.safetensors"
    assert_refused(cli_run_clean("remap", src, "-o", out, *R18), tmp_path, files(tmp_path))
    result = cli_run_clean("remap", src, "-o", out, *R18, "--allow-unexpected", "queue")
    assert result.exit_code == 0, result.output
    assert_written(out, sd, {k: k for k in sd})  # allowed, not dropped


def test_drop_mismatched_turns_a_new_head_into_missing(
    tmp_path: Path, r18_10: dict[str, torch.Tensor]
) -> None:
    torch.save(r18_10, src := tmp_path / "r18_10.pth")
    out = tmp_path / "out.safetensors"
    before = files(tmp_path)

    # The 10-class head does not fit the 1000-class model; no glob can allow that.
    result = cli_run_clean("remap", src, "-o", out, *R18, "--allow-missing", "fc.*")
    assert_refused(result, tmp_path, before)
    assert "shape mismatch (2):" in result.stdout

    # Dropped, the head is missing, which must be allowed too.
    result = cli_run_clean("remap", src, "-o", out, *R18, "--drop-mismatched")
    assert_refused(result, tmp_path, before)
    assert "dropped for their shape (now missing) (2):" in result.stdout
    assert "missing: in the model, not in the checkpoint (2):" in result.stdout

    result = cli_run_clean(
        "remap", src, "-o", out, *R18, "--drop-mismatched", "--allow-missing", "fc.*"
    )
    assert result.exit_code == 0, result.output
    assert "-> compatible" in result.stdout
    written = load_file(str(out))
    assert not any(k.startswith("fc.") for k in written)
    assert_written(out, r18_10, {k: k for k in r18_10 if not k.startswith("fc.")})
    assert "dropped 2" in result.stderr


def test_dry_run_with_a_model_prints_plan_and_report(tmp_path: Path, dp: tuple[Path, Any]) -> None:
    src, _ = dp
    before = files(tmp_path)
    result = cli_run_clean("remap", src, "--dry-run", "--strip-prefix", "module.", *R18)
    assert result.exit_code == 0, result.output
    assert "module.conv1.weight" in result.stdout and "->" in result.stdout  # the plan
    assert result.stdout.rstrip().endswith("-> compatible")  # the report
    assert "fits the model; nothing written" in result.stderr
    assert files(tmp_path) == before

    result = cli_run_clean("remap", src, "-o", tmp_path / "o.safetensors", "--dry-run", *R18)
    assert result.exit_code == 1
    assert result.stdout.rstrip().endswith("-> INCOMPATIBLE")
    assert "does NOT fit the model; nothing written" in result.stderr
    assert files(tmp_path) == before


def test_json_with_the_gate(tmp_path: Path, dp: tuple[Path, Any]) -> None:
    src, _ = dp
    out = tmp_path / "out.safetensors"
    result = cli_run_clean("remap", src, "-o", out, *R18, "--json")
    assert result.exit_code == 1
    refused = json.loads(result.stdout)
    assert refused["written"] is False
    assert refused["report"]["compatible"] is False
    assert len(refused["report"]["missing"]) == 122
    assert not out.exists()

    result = cli_run_clean("remap", src, "-o", out, *R18, "--strip-prefix", "module.", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["written"] is True and data["tensors"] == 122
    assert data["report"]["compatible"] is True
    assert data["report"]["missing"] == data["report"]["unexpected"] == []

    result = cli_run_clean("remap", src, "--dry-run", *R18, "--strip-prefix", "module.", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["report"]["compatible"] is True


@pytest.mark.parametrize(
    "flags",
    [
        ["--allow-missing", "fc.*"],
        ["--allow-unexpected", "queue"],
        ["--drop-mismatched"],
        ["--model-arg", "num_classes=10"],
    ],
)
def test_gate_flags_need_a_model(tmp_path: Path, dp: tuple[Path, Any], flags: list[str]) -> None:
    src, _ = dp
    result = cli_run_clean("remap", src, "-o", tmp_path / "o.safetensors", *flags)
    assert result.exit_code == 2
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "need --model" in errors[0]
    assert files(tmp_path) == {"dp.pth"}


def test_a_model_spec_that_does_not_resolve(tmp_path: Path, dp: tuple[Path, Any]) -> None:
    src, _ = dp
    result = cli_run_clean(
        "remap", src, "-o", tmp_path / "o.safetensors", "--model", "torchvision:resnt18"
    )
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and "resnet18" in result.stderr
    assert files(tmp_path) == {"dp.pth"}


# -- the library ------------------------------------------------------------------------------


def test_library_remap_gate_raises_with_the_report(
    tmp_path: Path, dp: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    src, sd = dp
    out = tmp_path / "out.safetensors"
    model = build_model("torchvision:resnet18")  # on meta: enough to match
    with pytest.raises(cs.IncompatibleCheckpoint, match="does not fit the model") as e:
        cs.remap(src, out, cs.Rules(), gate=Gate(model))
    assert isinstance(e.value, cs.CheckpointError)
    report = e.value.report
    assert isinstance(report, MatchReport) and not report.compatible
    assert len(report.missing) == len(report.unexpected) == 122
    assert files(tmp_path) == {"dp.pth"}

    # The module itself works as well as the BuiltModel; a head may be allowed to miss.
    rules = cs.Rules(strip_prefix=["module."], drop=["module.fc.*"])
    result = cs.remap(src, out, rules, gate=Gate(model.module, allow_missing=("fc.*",)))
    assert result.report is not None and result.report.compatible
    assert result.report.missing == ["fc.weight", "fc.bias"]
    assert result.written is not None and result.written.tensors == 120
    assert_written(out, sd, {k.removeprefix("module."): k for k in sd if ".fc." not in k})


def test_library_gate_drop_mismatched(tmp_path: Path, r18_10: dict[str, torch.Tensor]) -> None:
    torch.save(r18_10, src := tmp_path / "r18_10.pth")
    out = tmp_path / "out.safetensors"
    model = build_model("torchvision:resnet18")
    with pytest.raises(cs.IncompatibleCheckpoint) as e:
        cs.remap(src, out, cs.Rules(), gate=Gate(model, drop_mismatched=True))
    assert [m.key for m in e.value.report.dropped_mismatched] == ["fc.weight", "fc.bias"]
    assert not out.exists()
    gate = Gate(model, drop_mismatched=True, allow_missing=("fc.*",))
    result = cs.remap(src, out, cs.Rules(), gate=gate)
    assert "fc.weight" in result.plan.dropped
    assert not any(k.startswith("fc.") for k in load_file(str(out)))


def test_load_into_refuses_and_leaves_the_model_untouched(r18_10: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(2)
    model = torchvision.models.resnet18(weights=None)
    before = {k: raw(v) for k, v in model.state_dict().items()}

    with pytest.raises(cs.IncompatibleCheckpoint, match="shape mismatch") as e:
        load_into(model, r18_10)
    assert [m.key for m in e.value.report.shape_mismatch] == ["fc.weight", "fc.bias"]
    dp = {"module." + k: v for k, v in r18_10.items()}
    with pytest.raises(cs.IncompatibleCheckpoint, match="Nothing was loaded") as e:
        load_into(model, dp)
    assert len(e.value.report.missing) == 122
    assert {k: raw(v) for k, v in model.state_dict().items()} == before

    # Told to drop the head and keep the model's own, it loads the rest exactly.
    report = load_into(model, r18_10, drop_mismatched=True, allow_missing=["fc.*"])
    assert report.compatible and report.missing == ["fc.weight", "fc.bias"]
    after = model.state_dict()
    for k, v in r18_10.items():
        assert raw(after[k]) == (before[k] if k.startswith("fc.") else raw(v)), k
