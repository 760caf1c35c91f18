"""The shape adapters end to end: real timm and torchvision checkpoints adapted by `remap`,
gated against the target model, loaded strictly; dry runs, JSON, provenance and recipes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    assert_error,
    assert_ok,
    cli_run,
    import_source,
    raw,
    run_without_torch,
    write_safetensors,
)
from safetensors import safe_open
from safetensors.torch import load_file

timm = pytest.importorskip("timm", reason="the adapters are checked against timm's functions")
torchvision = pytest.importorskip("torchvision")

NETS = """
import torch
from torchvision.models import resnet18


def resnet18_gray(**kwargs):
    model = resnet18(**kwargs)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model
"""


@pytest.fixture
def nets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    yield from import_source(tmp_path, "cs_adapter_nets", NETS, monkeypatch)


@pytest.fixture(scope="module")
def vit224(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path_factory.mktemp("vit") / "vit_tiny_224.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_vit_224_resampled_to_384_loads_strictly(vit224: Path, tmp_path: Path) -> None:
    out = tmp_path / "vit384.safetensors"
    result = cli_run(
        "remap", vit224, "-o", out,
        "--resample-pos-embed", "pos_embed", "24x24",
        "--model", "timm:vit_tiny_patch16_384",
    )  # fmt: skip
    assert_ok(result)
    assert "fits the model" in result.stderr
    sd = load_file(out)
    model = timm.create_model("vit_tiny_patch16_384", pretrained=False)
    model.load_state_dict(sd, strict=True)
    source = torch.load(vit224, weights_only=True)
    want = timm.layers.resample_abs_pos_embed(source["pos_embed"], [24, 24], num_prefix_tokens=1)
    assert sd["pos_embed"].shape == (1, 577, 192)
    assert (sd["pos_embed"] - want).abs().max().item() <= 1e-6
    assert raw(sd["cls_token"]) == raw(source["cls_token"])  # every other tensor copied
    # without the adapter the gate refuses, naming the position embedding
    result = cli_run(
        "remap", vit224, "-o", tmp_path / "no.safetensors", "--model", "timm:vit_tiny_patch16_384"
    )
    assert result.exit_code == 1 and "pos_embed" in result.output
    assert not (tmp_path / "no.safetensors").exists()


def test_resnet_conv1_to_one_channel(resnet: Path, tmp_path: Path, nets: Any) -> None:
    out = tmp_path / "gray.safetensors"
    result = cli_run(
        "remap", resnet, "-o", out, "--in-chans", "conv1.weight", "1",
        "--model", "cs_adapter_nets:resnet18_gray",
    )  # fmt: skip
    assert_ok(result)
    sd = load_file(out)
    nets.resnet18_gray().load_state_dict(sd, strict=True)
    source = torch.load(resnet, weights_only=True)["conv1.weight"]
    want = timm.models.adapt_input_conv(1, source)
    assert (sd["conv1.weight"] - want).abs().max().item() <= 1e-6


def test_resnet_head_to_ten_classes(resnet: Path, tmp_path: Path) -> None:
    out = tmp_path / "ten.pth"
    result = cli_run(
        "remap", resnet, "-o", out, "--rows", "fc.*", "0-9",
        "--model", "torchvision:resnet18", "--model-arg", "num_classes=10",
    )  # fmt: skip
    assert_ok(result)
    sd = torch.load(out, weights_only=True)
    torchvision.models.resnet18(num_classes=10).load_state_dict(sd, strict=True)
    source = torch.load(resnet, weights_only=True)
    assert raw(sd["fc.weight"]) == raw(source["fc.weight"][:10])
    assert raw(sd["fc.bias"]) == raw(source["fc.bias"][:10])


def test_rows_from_a_file_beside_the_current_folder(
    resnet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("classes.txt").write_text("# ten ImageNet classes\n207\n208\n1-3\n0\n", encoding="utf-8")
    result = cli_run("remap", resnet, "-o", "out.pth", "--rows", "fc.weight", "@classes.txt")
    assert_ok(result)
    sd = torch.load("out.pth", weights_only=True)
    source = torch.load(resnet, weights_only=True)
    picked = [207, 208, 1, 2, 3, 0]
    assert raw(sd["fc.weight"]) == raw(source["fc.weight"][picked])
    assert raw(sd["fc.bias"]) == raw(source["fc.bias"][picked])  # the bias beside the weight


def test_dry_run_json_and_provenance_show_the_ops(vit224: Path, tmp_path: Path) -> None:
    flags = [
        "--rows", "head.*", "0-9",
        "--in-chans", "patch_embed.proj.weight", "1",
        "--resample-pos-embed", "pos_embed", "24x24",
    ]  # fmt: skip
    result = cli_run("remap", vit224, "--dry-run", *flags)
    assert_ok(result)
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "resample-pos-embed 14x14->24x24" in rows["pos_embed"]
    assert "[1, 577, 192]" in rows["pos_embed"]
    assert "in-chans 3->1" in rows["patch_embed.proj.weight"]
    assert "rows 10 of 1000" in rows["head.weight"] and "[10, 192]" in rows["head.weight"]
    assert "rows 10 of 1000" in rows["head.bias"]

    result = cli_run("remap", vit224, "--dry-run", "--json", *flags)
    assert_ok(result)
    data = json.loads(result.stdout)
    entries = {e["key"]: e for e in data["plan"]["entries"]}
    assert entries["pos_embed"]["op"] == "resample-pos-embed"
    assert entries["pos_embed"]["size"] == [24, 24] and entries["pos_embed"]["old_size"] == [14, 14]
    assert entries["pos_embed"]["shape"] == [1, 577, 192]
    assert entries["head.bias"]["indices"] == list(range(10))
    assert data["adapters"][1] == {
        "op": "in-chans",
        "key": "patch_embed.proj.weight",
        "channels": 1,
    }

    out = tmp_path / "out.safetensors"
    assert_ok(cli_run("remap", vit224, "-o", out, *flags))
    with safe_open(str(out), "pt") as f:
        plan = json.loads(f.metadata()["ckptsurgery.plan"])
    ops = {g["op"]: g for g in plan["ops"]}
    assert ops["rows"]["keys"] == ["head.{bias, weight}"] and ops["rows"]["of"] == 1000
    assert ops["in-chans"]["channels"] == 1 and ops["in-chans"]["base_chans"] == 3
    assert ops["resample-pos-embed"]["antialias"] is True


def test_recipe_round_trip(vit224: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out.safetensors"
    recipe = work / "adapt.toml"
    flags = [
        "--rows", "head.*", "0-4,9,7",
        "--in-chans", "patch_embed.proj.weight", "4",
        "--resample-pos-embed", "pos_embed", "12x16", "--interpolation", "bilinear",
        "--no-antialias", "--dtype", "bfloat16",
    ]  # fmt: skip
    assert_ok(cli_run("remap", vit224, "-o", out, "--emit-recipe", recipe, *flags))
    text = recipe.read_text()
    assert '[[adapt]]\nop = "rows"\nkey = "head.*"\nindices = "0-4,9,7"' in text
    assert 'size = "12x16"' in text and "antialias = false" in text
    by_remap = work / "by_remap.safetensors"
    shutil.move(out, by_remap)

    result = cli_run("apply", recipe)
    assert_ok(result)
    first, second = load_file(by_remap), load_file(out)
    assert list(first) == list(second)
    for k in first:
        assert first[k].dtype == second[k].dtype and raw(first[k]) == raw(second[k]), k
    assert second["pos_embed"].shape == (1, 193, 192)
    assert second["patch_embed.proj.weight"].shape == (192, 4, 16, 16)
    # applying it again writes the same bytes
    data = out.read_bytes()
    assert_ok(cli_run("apply", recipe, "--force"))
    assert out.read_bytes() == data
    with safe_open(str(out), "pt") as f:
        plan = json.loads(f.metadata()["ckptsurgery.plan"])
    assert {g["op"] for g in plan["ops"]} >= {"rows", "in-chans", "resample-pos-embed"}


def test_merge_takes_adapters(resnet: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra.pth"
    torch.save({"extra.weight": torch.ones(2)}, extra)
    out = tmp_path / "merged.safetensors"
    result = cli_run("merge", resnet, extra, "-o", out, "--rows", "fc.*", "0,1")
    assert_ok(result)
    assert load_file(out)["fc.weight"].shape == (2, 512)
    result = cli_run(
        "merge", resnet, resnet, "--average", "-o", tmp_path / "a.pth", "--rows", "fc.*", "0"
    )
    assert_error(result, "not to an average")


def test_unmatched_adapter_is_a_note(resnet: Path) -> None:
    result = cli_run("remap", resnet, "--dry-run", "--rows", "head.*", "0")
    assert_ok(result)
    assert "note: --rows 'head.*' 0 matched no key" in result.stderr


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--rows", "fc.*", "0,x"], ["--rows 'fc.*' 0,x", "'x' is not a row index"]),
        (["--rows", "fc.*", "5-1"], ["runs backwards"]),
        (["--rows", "fc.*", "@missing.txt"], ["indices file 'missing.txt' does not exist"]),
        (["--rows", "fc.*", "999,1000"], ["index 1000 is out of range for fc.", "1000 rows"]),
        (["--in-chans", "fc.bias", "1"], ["fc.bias has shape [1000]", "convolution weight"]),
        (["--in-chans", "conv1.weight", "0"], ["channels must be a whole number >= 1"]),
        (["--in-chans", "conv1.weight", "two"], ["'two' is not a valid integer"]),
        (["--resample-pos-embed", "fc.weight", "24x24"], ["not a square grid", "--old-size"]),
        (["--resample-pos-embed", "fc.weight", "24y"], ["'24y' is not a grid size"]),
        (["--prefix-tokens", "2"], ["need --resample-pos-embed"]),
        (["--rows", "fc.*", "0", "--rows", "fc.weight", "1"], ["matched by two adapters"]),
    ],
)
def test_bad_adapters_exit_2(
    resnet: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    fragments: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli_run("remap", resnet, "-o", "out.safetensors", *flags)
    assert_error(result, *fragments)
    assert not (tmp_path / "out.safetensors").exists()


def test_the_readme_library_example(vit224: Path, tmp_path: Path) -> None:
    import ckptsurgery as cs

    out = tmp_path / "vit_384.safetensors"
    result = cs.remap(
        vit224,
        out,
        cs.Rules(),
        adapters=[
            cs.ResamplePosEmbed("pos_embed", (24, 24)),
            cs.InChans("patch_embed.proj.weight", 1),
            cs.Rows("head.*", range(10)),
        ],
    )
    assert [e.op.describe() for e in result.plan.entries if not e.op.is_copy] == [
        "resample-pos-embed 14x14->24x24",
        "in-chans 3->1",
        "rows 10 of 1000",
        "rows 10 of 1000",
    ]
    model = timm.create_model("vit_tiny_patch16_384", pretrained=False, in_chans=1, num_classes=10)
    model.load_state_dict(load_file(out), strict=True)


def test_a_dry_run_with_adapters_reads_headers_only(tmp_path: Path) -> None:
    header = {
        "fc.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]},
        "fc.bias": {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]},
    }
    write_safetensors(tmp_path / "m.safetensors", header, bytes(48))
    proc = run_without_torch(
        """
        cli("remap", "m.safetensors", "-o", "out.safetensors", "--dry-run", "--rows", "fc.*",
            "2,0", "--emit-recipe", "r.toml")
        """,
        tmp_path,
    )
    assert "rows 2 of 4" in proc.stdout
    assert 'indices = "2,0"' in (tmp_path / "r.toml").read_text()
