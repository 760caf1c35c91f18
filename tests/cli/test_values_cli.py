"""`ckptsurgery diff A --against B --values`: the value diff on the command line."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_error, assert_ok, cli_run_clean
from safetensors.torch import save_file

from ckptsurgery.cli._values import SORT_STATS
from ckptsurgery.valuediff import STATS


def model_sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(50, 16, generator=g),
        "blocks.0.attn.weight": torch.randn(16, 16, generator=g),
        "blocks.0.attn.bias": torch.randn(16, generator=g),
        "blocks.1.attn.weight": torch.randn(16, 16, generator=g),
        "blocks.1.attn.bias": torch.randn(16, generator=g),
        "head.weight": torch.randn(4, 16, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
    }


@pytest.fixture
def ref(tmp_path: Path) -> Path:
    torch.save(model_sd(), tmp_path / "ref.pt")
    return tmp_path / "ref.pt"


def test_identical_files_are_bit_equal_and_exit_0(tmp_path: Path, ref: Path) -> None:
    same = tmp_path / "same.safetensors"
    save_file(model_sd(), same)  # another format, the same tensors
    for extra in ([], ["--bit-equal"], ["--atol", "0"]):
        result = cli_run_clean("diff", same, "--against", ref, "--values", *extra)
        assert_ok(result)
        assert "7 tensors compared; 7 bit-equal" in result.stdout
    payload = json.loads(cli_run_clean("diff", same, "--against", ref, "--json", "--values").stdout)
    assert all(t["bit_equal"] for t in payload["tensors"]) and payload["passed"]
    assert payload["overall"]["bit_equal"] == 7 and payload["overall"]["rel_l2"] == 0


def test_a_perturbed_tensor_is_reported_and_fails_atol(tmp_path: Path, ref: Path) -> None:
    sd = model_sd()
    sd["blocks.1.attn.bias"] = sd["blocks.1.attn.bias"] + 1e-3
    changed = tmp_path / "changed.pt"
    torch.save(sd, changed)
    report = cli_run_clean("diff", changed, "--against", ref, "--values", "--json")
    assert_ok(report)  # --values alone reports
    payload = json.loads(report.stdout)
    tensors = {t["key"]: t for t in payload["tensors"]}
    assert tensors["blocks.1.attn.bias"]["max_abs"] == pytest.approx(1e-3, rel=1e-3)
    assert not tensors["blocks.1.attn.bias"]["bit_equal"]
    assert sum(not t["bit_equal"] for t in payload["tensors"]) == 1
    blocks = {b["block"]: b for b in payload["blocks"]}
    assert blocks["blocks.1"]["rel_l2"] > 0 and blocks["blocks.0"]["rel_l2"] == 0
    assert list(blocks) == ["embed", "blocks.0", "blocks.1", "head", "bn"]  # model order

    check = cli_run_clean("diff", changed, "--against", ref, "--atol", "1e-4")
    assert check.exit_code == 1, check.output
    assert "Error:" not in check.stderr
    assert "1 of 7 tensors outside atol=0.0001, rtol=0; worst: blocks.1.attn.bias" in check.stderr
    assert "16 of 16 elements outside" in check.stderr
    assert "FAIL" in check.stdout and "FAILED" in check.stdout
    assert_ok(cli_run_clean("diff", changed, "--against", ref, "--atol", "1e-2"))
    bits = cli_run_clean("diff", changed, "--against", ref, "--bit-equal")
    assert bits.exit_code == 1 and "bytes differ" in bits.stderr


def test_a_bfloat16_cast_reports_relative_errors_of_1e_3(tmp_path: Path, ref: Path) -> None:
    cast = tmp_path / "cast.safetensors"
    assert_ok(cli_run_clean("remap", ref, "-o", cast, "--dtype", "bfloat16"))
    result = cli_run_clean("diff", cast, "--against", ref, "--values", "--json")
    assert_ok(result)
    for t in json.loads(result.stdout)["tensors"]:
        if t["dtype_b"] == "float32":
            assert (t["dtype_a"], t["bit_equal"]) == ("bfloat16", False)
            assert 1e-4 < t["rel_l2"] < 1e-2, t
    text = cli_run_clean("diff", cast, "--against", ref, "--values")
    assert "dtype bfloat16 -> float32" in text.stdout
    assert "6 with another dtype" in text.stdout


def test_nan_is_counted(tmp_path: Path, ref: Path) -> None:
    sd = model_sd()
    sd["head.weight"][1, 2] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(sd, bad)
    result = cli_run_clean("diff", bad, "--against", ref, "--values", "--json")
    assert_ok(result)
    head = next(t for t in json.loads(result.stdout)["tensors"] if t["key"] == "head.weight")
    assert (head["nan_a"], head["nan_b"]) == (1, 0)
    check = cli_run_clean("diff", bad, "--against", ref, "--atol", "1")
    assert check.exit_code == 1 and "head.weight" in check.stderr


def test_sort_top_depth_and_table_formats(tmp_path: Path, ref: Path) -> None:
    sd = {k: v * 1.5 if k.startswith("head") else v for k, v in model_sd().items()}
    other = tmp_path / "other.pt"
    torch.save(sd, other)
    result = cli_run_clean(
        "diff", other, "--against", ref, "--sort", "rel_l2", "--top", "1", "--fmt", "github"
    )
    assert_ok(result)
    assert "tensors (1 of 7, by rel_l2):" in result.stdout
    tensor_table = result.stdout.split("tensors (1 of 7, by rel_l2):")[1]
    assert "| head.weight" in tensor_table and "blocks.0.attn.weight" not in tensor_table
    blocks = json.loads(
        cli_run_clean("diff", other, "--against", ref, "--depth", "1", "--json").stdout
    )["blocks"]
    assert [b["block"] for b in blocks] == ["embed", "blocks", "head", "bn"]
    assert set(SORT_STATS) == set(STATS)


def test_shape_differences_and_unpaired_keys(tmp_path: Path, ref: Path) -> None:
    sd = model_sd()
    sd["head.weight"] = torch.zeros(5, 16)
    del sd["embed.weight"]
    other = tmp_path / "other.pt"
    torch.save(sd, other)
    result = cli_run_clean("diff", other, "--against", ref, "--values")
    assert_ok(result)
    assert "shape [5, 16] vs [4, 16]: not compared" in result.stdout
    assert "only in B (1):\n  embed.weight" in result.stdout
    check = cli_run_clean("diff", other, "--against", ref, "--atol", "1")
    assert check.exit_code == 1
    assert "head.weight (shapes differ)" in check.stderr
    assert "1 key without a pair: embed.weight" in check.stderr
    allowed = cli_run_clean(
        "diff", other, "--against", ref, "--bit-equal", "--allow-missing", "embed.*"
    )
    assert allowed.exit_code == 1 and "without a pair" not in allowed.stderr


def test_usage_errors(tmp_path: Path, ref: Path) -> None:
    assert_error(
        cli_run_clean("diff", ref, "--model", "torchvision:resnet18", "--values"),
        "--values compares two checkpoints: give --against REF",
    )
    assert_error(
        cli_run_clean("diff", ref, "--against", ref, "--values", "--suggest"),
        "do not go with --values",
    )
    assert_error(cli_run_clean("diff", ref, "--against", ref, "--atol", "-1"), "--atol")
    assert_error(
        cli_run_clean("diff", tmp_path / "nope.pt", "--against", ref, "--values"), "nope.pt"
    )


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_a_png(tmp_path: Path, ref: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    sd = {k: v + 1e-3 * i for i, (k, v) in enumerate(model_sd().items())}
    other = tmp_path / "other.pt"
    torch.save(sd, other)
    out = tmp_path / "out.png"
    result = cli_run_clean("diff", other, "--against", ref, "--values", "--plot", out)
    assert_ok(result)
    assert f"wrote the plot to {out}" in result.stderr
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width >= 600 and height >= 400
    # an existing picture is replaced only with --force, refused before any work
    assert_error(cli_run_clean("diff", other, "--against", ref, "--plot", out), "already exists")
    assert_ok(cli_run_clean("diff", other, "--against", ref, "--plot", out, "--force"))
    assert not list(tmp_path.glob(".out.png.*"))  # no temporary file left behind


def test_plot_without_matplotlib_is_a_clear_error(
    tmp_path: Path, ref: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "out.png"
    error = assert_error(
        cli_run_clean("diff", ref, "--against", ref, "--plot", out),
        "pip install 'ckptsurgery[plot]'",
    )
    assert "matplotlib" in error
    assert not out.exists()


def test_help_imports_neither_torch_nor_matplotlib(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from ckptsurgery.cli import main
        sys.argv = ["ckptsurgery", "diff", "--help"]
        try:
            main()
        except SystemExit as e:
            assert e.code in (0, None), e.code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "matplotlib"))
        assert not heavy, heavy[:5]
        print("LIGHT")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0 and "LIGHT" in proc.stdout, proc.stdout + proc.stderr
    assert "--values" in proc.stdout and "--plot FILE.png" in proc.stdout


def test_the_rule_options_rename_a_before_the_pairing(tmp_path: Path, ref: Path) -> None:
    """diff takes remap's rule options with --values too: a DataParallel copy pairs up with
    its original once --strip-prefix module. renames it."""
    wrapped = tmp_path / "dp.safetensors"
    save_file({f"module.{k}": v for k, v in model_sd().items()}, wrapped)
    plain = cli_run_clean("diff", wrapped, "--against", ref, "--bit-equal", "--json")
    assert plain.exit_code == 1
    renamed = cli_run_clean(
        "diff", wrapped, "--against", ref, "--bit-equal", "--strip-prefix", "module.", "--json"
    )
    assert_ok(renamed)
    data = json.loads(renamed.stdout)
    assert len(data["tensors"]) == len(model_sd())
    assert all(t["bit_equal"] for t in data["tensors"])
