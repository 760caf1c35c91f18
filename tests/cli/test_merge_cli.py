"""`ckptsurgery merge` through CliRunner: exit codes, stdout and stderr apart, real files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyNet, assert_error, assert_ok, cli_run, raw, source_digest
from safetensors.torch import load_file, save_file
from torch import nn

from ckptsurgery.cli.merge_cmd import gather_weights


def run_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = TinyNet()
    for p in net.parameters():
        nn.init.normal_(p)
    net.bn.num_batches_tracked.fill_(10 * (seed + 1))
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in net.state_dict().items()}


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A backbone-only torch file (nested under "state_dict") and a head-only safetensors."""
    full = run_state(0)
    torch.save(
        {"epoch": 1, "state_dict": {k: v for k, v in full.items() if not k.startswith("fc.")}},
        tmp_path / "backbone.pth",
    )
    save_file({k: v for k, v in full.items() if k.startswith("fc.")}, tmp_path / "head.safetensors")
    return tmp_path / "backbone.pth", tmp_path / "head.safetensors", full


def test_backbone_plus_head_loads_strictly(parts: Any, tmp_path: Path) -> None:
    backbone, head, full = parts
    out = tmp_path / "model.safetensors"
    result = cli_run("merge", backbone, head, "-o", out)
    assert_ok(result)
    assert result.stdout == ""
    assert "using the state dict at 'state_dict'" in result.stderr
    summary = result.stderr.splitlines()[-1]
    assert summary.startswith("union of 2 sources: 9 tensors (backbone.pth 7, head.safetensors 2)")
    assert f"to {out}" in summary
    model = TinyNet()
    model.load_state_dict(load_file(out), strict=True)
    for k, v in load_file(out).items():
        assert raw(v) == raw(full[k])


def test_torch_output_is_a_flat_state_dict(parts: Any, tmp_path: Path) -> None:
    backbone, head, full = parts
    out = tmp_path / "model.pt"
    assert_ok(cli_run("merge", backbone, head, "-o", out))
    sd = torch.load(out, weights_only=True)
    assert sorted(sd) == sorted(full)
    TinyNet().load_state_dict(sd, strict=True)


def test_conflict_refused_naming_key_and_sources(tmp_path: Path) -> None:
    save_file({"fc.weight": torch.zeros(2), "a": torch.zeros(1)}, tmp_path / "one.safetensors")
    save_file({"fc.weight": torch.ones(2), "b": torch.zeros(1)}, tmp_path / "two.safetensors")
    out = tmp_path / "o.safetensors"
    result = cli_run("merge", tmp_path / "one.safetensors", tmp_path / "two.safetensors", "-o", out)
    assert_error(
        result,
        "1 key is in several sources",
        "fc.weight",
        "one.safetensors",
        "two.safetensors",
        "--on-conflict first|last",
    )
    assert not out.exists()


@pytest.mark.parametrize(("policy", "winner"), [("first", 0), ("last", 2)])
def test_conflict_first_or_last(tmp_path: Path, policy: str, winner: int) -> None:
    paths, values = [], []
    for i in range(3):
        values.append(torch.randn(4, generator=torch.Generator().manual_seed(i)))
        paths.append(tmp_path / f"s{i}.safetensors")
        save_file({"w": values[-1], f"only{i}": torch.tensor([i])}, paths[-1])
    out = tmp_path / "o.safetensors"
    result = cli_run("merge", *paths, "--on-conflict", policy, "-o", out)
    assert_ok(result)
    assert "1 key in several sources, each taken from the " + policy in result.stderr
    got = load_file(out)
    assert raw(got["w"]) == raw(values[winner])
    assert sorted(got) == ["only0", "only1", "only2", "w"]


def test_ties_survive_a_merge(tmp_path: Path) -> None:
    w = torch.randn(3, 2)
    torch.save({"embed.weight": w, "lm_head.weight": w}, tmp_path / "lm.pt")
    save_file({"norm.weight": torch.ones(2)}, tmp_path / "norm.safetensors")
    out = tmp_path / "o.safetensors"
    assert_ok(cli_run("merge", tmp_path / "lm.pt", tmp_path / "norm.safetensors", "-o", out))
    data = json.loads(cli_run("inspect", out, "--json").stdout)
    assert data["tied"] == {"lm_head.weight": "embed.weight"}


# --- averaging ------------------------------------------------------------------------------


def soup_inputs(tmp_path: Path, dtype: torch.dtype) -> tuple[list[Path], list[dict[str, Any]]]:
    sds = [run_state(i, dtype) for i in range(3)]
    paths = []
    for i, sd in enumerate(sds):
        paths.append(tmp_path / f"run{i}.safetensors")
        save_file(sd, paths[-1])
    return paths, sds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights", [["1", "2", "5"], ["1,2,5"], ["1", "--weights", "2,5"]])
def test_average_weighted(tmp_path: Path, dtype: torch.dtype, weights: list[str]) -> None:
    paths, sds = soup_inputs(tmp_path, dtype)
    out = tmp_path / "soup.safetensors"
    result = cli_run("merge", *paths, "--average", "--weights", *weights, "-o", out)
    assert_ok(result)
    assert "average of 3 sources (weights 0.125, 0.25, 0.625)" in result.stderr
    assert "8 tensors averaged, 1 copied from the first" in result.stderr
    assert "different values for 1 integer or bool tensor (bn.num_batches_tracked)" in result.stderr
    got = load_file(out)
    w = [0.125, 0.25, 0.625]
    for k, v in got.items():
        if k == "bn.num_batches_tracked":
            assert v.dtype == torch.int64 and raw(v) == raw(sds[0][k])
            continue
        assert v.dtype == dtype
        want = sum(wi * sd[k].double() for wi, sd in zip(w, sds, strict=True))
        torch.testing.assert_close(
            v,
            want.to(dtype),
            rtol=1e-6 if dtype == torch.float32 else None,
            atol=1e-6 if dtype == torch.float32 else None,
        )


def test_average_refuses_different_keys_and_shapes(tmp_path: Path) -> None:
    save_file(
        {"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.zeros(3)}, tmp_path / "x.safetensors"
    )
    save_file({"a": torch.zeros(2), "c": torch.zeros(4)}, tmp_path / "y.safetensors")
    out = tmp_path / "o.safetensors"
    result = cli_run(
        "merge", tmp_path / "x.safetensors", tmp_path / "y.safetensors", "--average", "-o", out
    )
    assert_error(
        result,
        "cannot average",
        "1 key only in",
        "x.safetensors (b)",
        "c has different shapes",
        "[3]",
        "[4]",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("weights", "fragment"),
    [
        (["1", "2"], "2 weights for 3 sources"),
        (["1", "2", "3", "4"], "4 weights for 3 sources"),
        (["1", "0", "2"], "weight 0.0 is not a positive number"),
        (["1,-1,2"], "weight -1.0 is not a positive number"),
        (["1,x,2"], "'x' is not a number"),
    ],
)
def test_average_bad_weights(tmp_path: Path, weights: list[str], fragment: str) -> None:
    paths, _ = soup_inputs(tmp_path, torch.float32)
    out = tmp_path / "o.safetensors"
    assert_error(cli_run("merge", *paths, "--average", "--weights", *weights, "-o", out), fragment)
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--weights", "1", "2", "3"], "--weights needs --average"),
        (["--average", "--on-conflict", "first"], "--on-conflict does not apply with --average"),
        (["--allow-missing", "fc.*"], "need --model"),
    ],
)
def test_usage_errors(tmp_path: Path, args: list[str], fragment: str) -> None:
    paths, _ = soup_inputs(tmp_path, torch.float32)
    assert_error(cli_run("merge", *paths, *args, "-o", tmp_path / "o.safetensors"), fragment)


def test_missing_output(tmp_path: Path) -> None:
    paths, _ = soup_inputs(tmp_path, torch.float32)
    assert_error(cli_run("merge", *paths), "'-o' / '--output'")


def test_existing_output_needs_force(tmp_path: Path) -> None:
    paths, _ = soup_inputs(tmp_path, torch.float32)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    assert_error(cli_run("merge", *paths, "--average", "-o", out), "--force")
    assert out.read_bytes() == b"keep me"
    assert_ok(cli_run("merge", *paths, "--average", "-o", out, "--force"))
    assert out.read_bytes() != b"keep me"


def test_gather_weights() -> None:
    assert gather_weights(["a", "--weights", "1", "2.5", "-o", "x"]) == [
        "a",
        "--weights=1,2.5",
        "-o",
        "x",
    ]
    assert gather_weights(["--weights", "1e-3", "b.pt"]) == ["--weights=1e-3", "b.pt"]
    assert gather_weights(["--weights", "1,2"]) == ["--weights", "1,2"]
    assert gather_weights(["--", "--weights", "1"]) == ["--", "--weights", "1"]


# --- dry run, JSON, gate, provenance -------------------------------------------------------


def test_dry_run_writes_nothing(parts: Any, tmp_path: Path) -> None:
    backbone, head, _ = parts
    out = tmp_path / "model.safetensors"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli_run("merge", backbone, head, "-o", out, "--dry-run")
    assert_ok(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert "backbone.pth" in result.stdout and "taken" in result.stdout
    assert result.stderr.splitlines()[-1].startswith("dry run: union of 2 sources: 9 tensors")
    assert result.stderr.splitlines()[-1].endswith("nothing written")


def test_dry_run_shows_conflicts(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(1)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(1)}, tmp_path / "b.safetensors")
    result = cli_run(
        "merge",
        tmp_path / "a.safetensors",
        tmp_path / "b.safetensors",
        "--on-conflict",
        "last",
        "--dry-run",
    )
    assert_ok(result)
    assert "key in several sources" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("w "))
    assert row.split()[-2:] == ["2", "(b.safetensors)"]


def test_json(parts: Any, tmp_path: Path) -> None:
    backbone, head, _ = parts
    out = tmp_path / "model.safetensors"
    result = cli_run("merge", backbone, head, "-o", out, "--json")
    assert_ok(result)
    data = json.loads(result.stdout)
    assert data["mode"] == "union" and data["written"] is True and data["tensors"] == 9
    assert [s["taken"] for s in data["sources"]] == [7, 2]
    assert data["origin"][1] == {
        "source": 1,
        "name": "head.safetensors",
        "count": 2,
        "keys": ["fc.{bias, weight}"],
    }
    assert data["conflicts"] == []


def test_gate_refuses_and_writes_nothing(parts: Any, tmp_path: Path) -> None:
    backbone, _, _ = parts
    out = tmp_path / "model.safetensors"
    result = cli_run("merge", backbone, "-o", out, "--model", "torchvision:resnet18")
    assert result.exit_code == 1, result.output
    assert "does not fit the model" in result.stderr and "nothing written" in result.stderr
    assert "missing" in result.stdout
    assert not out.exists()


def test_provenance_in_inspect_json(parts: Any, tmp_path: Path) -> None:
    backbone, head, _ = parts
    out = tmp_path / "model.safetensors"
    assert_ok(cli_run("merge", backbone, head, "-o", out))
    data = json.loads(cli_run("inspect", out, "--json").stdout)
    prov = data["provenance"]
    from ckptsurgery import __version__

    assert prov["version"] == __version__
    assert prov["sources"] == [
        {
            "name": "backbone.pth",
            **source_digest(backbone),
            "key": "state_dict",
        },
        {
            "name": "head.safetensors",
            **source_digest(head),
            "key": None,
        },
    ]
    assert prov["merge"] == {"mode": "union", "on_conflict": "error"}
    assert prov["origin"] == [
        {
            "source": 0,
            "name": "backbone.pth",
            "count": 7,
            "keys": [
                "conv.{bias, weight}",
                "bn.{bias, num_batches_tracked, running_mean, running_var, weight}",
            ],
        },
        {"source": 1, "name": "head.safetensors", "count": 2, "keys": ["fc.{bias, weight}"]},
    ]
    text = cli_run("inspect", out).stdout
    assert "provenance:" in text and "origin:" in text


def test_average_provenance_in_inspect(tmp_path: Path) -> None:
    paths, _ = soup_inputs(tmp_path, torch.float32)
    out = tmp_path / "soup.safetensors"
    assert_ok(cli_run("merge", *paths, "--average", "--weights", "1", "1", "2", "-o", out))
    prov = json.loads(cli_run("inspect", out, "--json").stdout)["provenance"]
    assert prov["merge"] == {
        "mode": "average",
        "weights": [0.25, 0.25, 0.5],
        "weights_given": [1.0, 1.0, 2.0],
    }
    assert [o["source"] for o in prov["origin"]] == ["all", 0]
    assert len(prov["sources"]) == 3


def test_gate_passes_and_is_recorded(parts: Any, tmp_path: Path) -> None:
    backbone, head, _ = parts
    out = tmp_path / "model.safetensors"
    spec = f"{__name__}:TinyNet"
    result = cli_run(
        "merge", backbone, head, "-o", out, "--model", spec, "--model-arg", "num_classes=3"
    )
    assert_ok(result)
    assert result.stdout.startswith("matched 9 of 9")
    assert "fits the model" in result.stderr.splitlines()[-1]
    prov = json.loads(cli_run("inspect", out, "--json").stdout)["provenance"]
    assert prov["target"] == {
        "model": spec,
        "model_args": {"num_classes": 3},
        "allow_missing": [],
        "allow_unexpected": [],
        "drop_mismatched": False,
    }
