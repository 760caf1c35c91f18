"""--dtype / --keep-dtype: casts equal torch's .to(dtype) bit for bit, and only where asked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import cli_run, raw
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckptsurgery as cs
from ckptsurgery.plan import ops


def awkward_values(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values where rounding matters: ties, subnormals, overflow, NaN payloads, signed zeros."""
    special = torch.tensor(
        [0.0, -0.0, 1.0, -1.0, 1e-40, -1e-45, 3.4e38, -3.4e38, 65504.0, 65520.0, 1e-8,
         float("inf"), float("-inf"), float("nan"), 1.00390625, 1.01171875, 2.0**-24, 2.0**-25],
        dtype=torch.float64,
    )  # fmt: skip
    rand = torch.randn(4099, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e3
    return torch.cat([special, rand]).to(dtype)


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    sd = model.state_dict()
    for k, v in sd.items():  # non-trivial running statistics and counters
        if k.endswith("running_var"):
            v.uniform_(0.5, 2.0)
        elif k.endswith("running_mean"):
            v.normal_()
        elif k.endswith("num_batches_tracked"):
            v.fill_(1234)
    path = tmp_path_factory.mktemp("r50") / "resnet50.safetensors"
    save_file(sd, str(path))
    return path


def test_resnet50_bfloat16_with_running_stats_kept(resnet50: Path, tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    out = tmp_path / "bf16.safetensors"
    result = cli_run(
        "remap", resnet50, "-o", out, "--dtype", "bfloat16", "--keep-dtype", "*.running_*"
    )
    assert result.exit_code == 0, result.output
    src, got = load_file(str(resnet50)), load_file(str(out))
    assert sorted(got) == sorted(src)
    cast = kept = 0
    for k, v in src.items():
        if "running_" in k or k.endswith("num_batches_tracked"):
            assert got[k].dtype == v.dtype and raw(got[k]) == raw(v), k
            kept += 1
        else:
            assert got[k].dtype == torch.bfloat16, k
            assert raw(got[k]) == raw(v.to(torch.bfloat16)), k
            cast += 1
    assert cast == 161 and kept == 3 * 53  # weights/biases; mean, var, counter of 53 BNs
    model = torchvision.models.resnet50(weights=None)
    model.load_state_dict(got, strict=True)  # loads strictly (cast to the model's dtype)
    assert "161 tensors cast to bfloat16" in result.stderr


def test_dry_run_shows_casts_and_bytes_saved(resnet50: Path) -> None:
    result = cli_run(
        "remap", resnet50, "--dtype", "float16", "--keep-dtype", "*.running_*", "--dry-run"
    )
    assert result.exit_code == 0, result.output
    # columns: key, arrow, new key, op, shape, dtype, bytes; alike tensors share a row
    cells = [re.split(r"\s{2,}", line) for line in result.stdout.splitlines() if line]
    rows = {c[0]: c for c in cells}
    assert rows["conv1.weight"][3] == "cast ->float16"
    assert rows["bn1.{running_mean, running_var}"][3] == "copy"
    assert rows["bn1.num_batches_tracked"][3] == "copy"
    assert "161 tensors cast to float16" in result.stdout
    assert "saved" in result.stdout
    payload = json.loads(
        cli_run("remap", resnet50, "--dtype", "float16", "--dry-run", "--json").stdout
    )
    plan = payload["plan"]
    entry = next(e for e in plan["entries"] if e["key"] == "fc.weight")
    assert entry["op"] == "cast" and entry["dtype"] == "float16"
    assert entry["bytes"] == 1000 * 2048 * 2
    assert entry["sources"] == [{"source": 0, "key": "fc.weight"}]
    # float32 -> float16 halves every floating tensor; the counters stay int64
    assert plan["bytes_saved"] == (plan["input_bytes"] - 53 * 8) // 2
    assert plan["total_bytes"] == plan["input_bytes"] - plan["bytes_saved"]


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dst", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_cast_bits_equal_torch(tmp_path: Path, src_dtype: torch.dtype, dst: str, fmt: str) -> None:
    t = awkward_values(src_dtype)
    src = tmp_path / "in.safetensors"
    save_file({"w": t, "n": torch.arange(5), "b": torch.tensor([True, False])}, str(src))
    out = tmp_path / f"out.{fmt}"
    cs.remap(src, out, cs.Rules(), dtype=dst)
    got = cs.load_state_dict(out)
    want = t.to(getattr(torch, dst))
    assert got["w"].dtype == want.dtype and raw(got["w"]) == raw(want)
    assert got["n"].dtype == torch.int64 and got["b"].dtype == torch.bool  # never cast


def test_cast_streams_in_chunks_across_element_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk that is not a whole number of elements, and a source that hands its bytes over
    in odd pieces: the output is still exactly torch's."""
    monkeypatch.setattr(ops, "CAST_CHUNK", 30)  # 7 float32 elements and 2 bytes
    import io

    t = awkward_values(torch.float32)
    data = raw(t)
    sink = io.BytesIO()
    w = ops.CastWriter(sink, "float32", "bfloat16")
    for i in range(0, len(data), 13):  # odd pieces
        w.write(data[i : i + 13])
    w.close()
    assert sink.getvalue() == raw(t.to(torch.bfloat16))
    w = ops.CastWriter(io.BytesIO(), "float32", "bfloat16")
    w.write(data[:6])
    with pytest.raises(cs.RuleError, match="not whole"):
        w.close()


def test_tied_tensors_stay_tied_when_cast_alike(tmp_path: Path) -> None:
    w = torch.randn(4, 3)
    src = tmp_path / "tied.pt"
    torch.save({"embed.weight": w, "lm_head.weight": w, "norm.weight": torch.ones(3)}, src)
    out = tmp_path / "o.safetensors"
    result = cs.remap(src, out, cs.Rules(), dtype="bfloat16", keep_dtype=["norm.*"])
    assert result.plan.ties == {"lm_head.weight": "embed.weight"}
    got = cs.load_state_dict(out)
    assert got["lm_head.weight"].data_ptr() == got["embed.weight"].data_ptr()
    assert got["norm.weight"].dtype == torch.float32
    # one tied name kept in float32: the pair is no longer one tensor
    result = cs.remap(
        src, None, cs.Rules(), dtype="bfloat16", keep_dtype=["lm_head.*"], dry_run=True
    )
    assert result.plan.ties == {}


def test_average_with_dtype_is_the_float32_mean_cast(tmp_path: Path) -> None:
    paths = []
    tensors = [torch.randn(33, 7, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for i, t in enumerate(tensors):
        paths.append(tmp_path / f"r{i}.safetensors")
        save_file({"w": t, "steps": torch.tensor(7)}, str(paths[-1]))
    out = tmp_path / "soup.safetensors"
    result = cli_run(
        "merge", *paths, "--average", "--weights", "1", "2", "3", "--dtype", "bfloat16", "-o", out
    )
    assert result.exit_code == 0, result.output
    mean = tensors[0] * (1 / 6)
    mean.add_(tensors[1], alpha=2 / 6).add_(tensors[2], alpha=3 / 6)
    got = load_file(str(out))
    assert raw(got["w"]) == raw(mean.to(torch.bfloat16))
    assert got["steps"].dtype == torch.int64


def test_provenance_records_the_plan(tmp_path: Path) -> None:
    src = tmp_path / "in.safetensors"
    save_file({"a.w": torch.randn(2, 2), "a.n": torch.tensor(3)}, str(src))
    out = tmp_path / "o.safetensors"
    assert (
        cli_run("remap", src, "-o", out, "--strip-prefix", "a.", "--dtype", "float16").exit_code
        == 0
    )
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    plan = json.loads(meta["ckptsurgery.plan"])
    assert plan["mode"] == "remap" and plan["dtype"] == "float16"
    assert {"op": "cast", "dtype": "float16", "from": "float32", "count": 1, "keys": ["w"]} in plan[
        "ops"
    ]
    assert {"op": "copy", "count": 1, "keys": ["n"]} in plan["ops"]
    assert json.loads(meta["ckptsurgery.rules"]) == {"strip_prefix": ["a."]}


def test_keep_dtype_needs_dtype_and_unused_globs_are_noted(tmp_path: Path) -> None:
    src = tmp_path / "in.safetensors"
    save_file({"w": torch.randn(2)}, str(src))
    result = cli_run("remap", src, "-o", tmp_path / "o.safetensors", "--keep-dtype", "*.x")
    assert result.exit_code == 2 and result.stderr.startswith("Error:")
    result = cli_run("remap", src, "--dtype", "bfloat16", "--keep-dtype", "*.x", "--dry-run")
    assert result.exit_code == 0
    assert "note: --keep-dtype *.x matched no key" in result.stderr
    result = cli_run("remap", src, "--dtype", "float8", "--dry-run")
    assert result.exit_code == 2 and "float8" in result.stderr


def test_the_cli_offers_the_dtypes_the_plan_casts_to() -> None:
    from ckptsurgery.cli._options import DTYPES

    assert DTYPES == ops.CAST_DTYPES  # kept apart so that --help needs no torch


def test_cast_into_shards_and_from_a_sharded_source(tmp_path: Path) -> None:
    sd = {
        f"blocks.{i}.w": torch.randn(64, 64, generator=torch.Generator().manual_seed(i))
        for i in range(4)
    }
    sd["steps"] = torch.tensor(3)
    src = tmp_path / "in.safetensors"
    save_file(sd, str(src))
    shards = tmp_path / "shards"
    cs.remap(src, shards, cs.Rules(), dtype="float16", max_shard_size=20000)
    got = cs.load_state_dict(shards)
    assert len(list(shards.glob("*.safetensors"))) > 1
    for k, v in sd.items():
        want = v.to(torch.float16) if v.is_floating_point() else v
        assert got[k].dtype == want.dtype and raw(got[k]) == raw(want)
    back = tmp_path / "back.pt"
    cs.remap(shards, back, cs.Rules(), dtype="float32")
    again = cs.load_state_dict(back)
    assert raw(again["blocks.0.w"]) == raw(sd["blocks.0.w"].to(torch.float16).to(torch.float32))
