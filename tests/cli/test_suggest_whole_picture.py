"""``diff --suggest`` on real third-party layouts, from the suggestion to a loaded model.

A detector's VGG-16-BN backbone stored under four sibling ``slice`` prefixes with continuing
layer indices; a head renamed inside the network (``module.linear`` for ``fc``); several
nested state dicts (``student``/``teacher``, ``model``/``model_ema``); a checkpoint that needs
no rule at all; ``diff`` with rule options of its own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_ok, cli_run_clean, raw
from safetensors.torch import load_file

torchvision = pytest.importorskip("torchvision")

VGG = ("--model", "torchvision:vgg16_bn")
R18 = ("--model", "torchvision:resnet18")
# Where the detector's slices cut torchvision's vgg16_bn.features (the indices continue).
SLICES = ((0, 12), (13, 22), (23, 32), (33, 43))


def diff_json(*args: str | Path) -> tuple[int, dict[str, Any]]:
    result = cli_run_clean("diff", *args, "--json")
    assert result.exit_code in (0, 1), result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return result.exit_code, data


@pytest.fixture(scope="module")
def vgg_features() -> dict[str, torch.Tensor]:
    """torchvision's own vgg16_bn ``features`` (its real layers, without the 400 MB
    classifier), keyed as in ``vgg16_bn().state_dict()``."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["D"], batch_norm=True)
    for m in features.modules():  # non-trivial statistics, so that a mix-up would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_()
            m.running_var.uniform_(0.5, 1.5)
    return {f"features.{k}": v for k, v in features.state_dict().items()}


def detector_checkpoint(features: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The layout of a text detector's checkpoint: ``features.<i>.`` stored as
    ``module.net.slice<k>.<i>.``, plus its own detection layers."""
    sd: dict[str, torch.Tensor] = {}
    for key, value in features.items():
        i = int(key.split(".")[1])
        k = next(n for n, (lo, hi) in enumerate(SLICES, 1) if lo <= i <= hi)
        sd[key.replace("features.", f"module.net.slice{k}.", 1)] = value
    g = torch.Generator().manual_seed(1)
    sd["module.net.conv_cls.0.weight"] = torch.randn(32, 64, 3, 3, generator=g)
    sd["module.net.conv_cls.0.bias"] = torch.randn(32, generator=g)
    sd["module.net.conv_cls.2.weight"] = torch.randn(2, 32, 1, 1, generator=g)
    return {"model": sd, "epoch": 12}


def test_vgg_slices_become_one_regex_and_the_recipe_loads(
    tmp_path: Path, vgg_features: dict[str, torch.Tensor]
) -> None:
    ckpt = detector_checkpoint(vgg_features)
    torch.save(ckpt, src := tmp_path / "craft.pth")
    code, data = diff_json(src, *VGG, "--suggest")
    assert code == 1
    s = data["suggestion"]
    # one regex for the four slices, matching every backbone key
    assert s["rules"] == {
        "drop": ["module.net.conv_cls.*"],
        "regex": [[r"^module\.net\.slice\d+\.", "features."]],
    }
    assert s["matched_after"] == len(vgg_features) == 91
    assert {
        "rule": r"--regex '^module\.net\.slice\d+\.' features.",
        "matches": 91,
        "kind": "rule",
    } in s["proposals"]
    assert {"rule": "--drop 'module.net.conv_cls.*'", "matches": 3, "kind": "rule"} in s[
        "proposals"
    ]
    # one glob for what stays missing, not one line per index
    assert s["allow_missing"] == ["classifier.*"]
    assert all(k.startswith("classifier.") for k in s["missing_after"])
    assert s["command"].count("--allow-missing") == 1

    recipe = tmp_path / "craft.toml"
    result = cli_run_clean("diff", src, *VGG, "--suggest", "--emit-recipe", recipe)
    assert result.exit_code == 1
    assert_ok(cli_run_clean("apply", recipe))
    written = load_file(str(tmp_path / "craft_remapped.safetensors"))
    with torch.device("meta"):
        model = torchvision.models.vgg16_bn()
    loaded = model.load_state_dict(written, strict=False, assign=True)
    assert loaded.unexpected_keys == []
    assert loaded.missing_keys and all(k.startswith("classifier.") for k in loaded.missing_keys)
    for key, value in vgg_features.items():
        assert raw(model.state_dict()[key]) == raw(value), key


def test_diff_takes_rule_options(tmp_path: Path, vgg_features: dict[str, torch.Tensor]) -> None:
    torch.save(detector_checkpoint(vgg_features), src := tmp_path / "craft.pth")
    rule = ("--regex", r"^module\.net\.slice\d+\.", "features.")
    code, data = diff_json(src, *VGG, *rule, "--allow-missing", "classifier.*")
    assert code == 1  # the detection layers are still unexpected
    assert len(data["matched"]) == 91 and data["unexpected"] == [
        "module.net.conv_cls.0.weight",
        "module.net.conv_cls.0.bias",
        "module.net.conv_cls.2.weight",
    ]
    drop = ("--drop", "module.net.conv_cls.*")
    code, data = diff_json(src, *VGG, *rule, *drop, "--allow-missing", "classifier.*")
    assert code == 0 and data["compatible"]

    # the same rules from a file; a rule that matches nothing is reported
    rules = tmp_path / "rules.toml"
    rules.write_text(
        'key = "model"\ndrop = ["module.net.conv_cls.*"]\n'
        'regex = [["^module\\\\.net\\\\.slice\\\\d+\\\\.", "features."]]\n'
    )
    result = cli_run_clean(
        "diff",
        src,
        *VGG,
        "--rules",
        rules,
        "--strip-prefix",
        "nothing.",
        "--allow-missing",
        "classifier.*",
    )
    assert result.exit_code == 0, result.output
    assert "rule --strip-prefix nothing. matched no key" in result.stderr
    assert not list(tmp_path.glob("*.safetensors"))  # diff never writes

    # --suggest starts from the rules given: its command holds them, and what it adds
    code, data = diff_json(src, *VGG, *rule, "--suggest")
    s = data["suggestion"]
    assert s["rules"] == {
        "drop": ["module.net.conv_cls.*"],
        "regex": [[r"^module\.net\.slice\d+\.", "features."]],
    }
    assert s["matched_before"] == 91


def test_strip_prefix_in_diff(tmp_path: Path) -> None:
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18().state_dict()
    torch.save({"module." + k: v for k, v in r18.items()}, src := tmp_path / "dp.pth")
    code, _ = diff_json(src, *R18)
    assert code == 1
    code, data = diff_json(src, *R18, "--strip-prefix", "module.")
    assert code == 0 and len(data["matched"]) == len(r18)


def test_inner_rename_is_proposed(tmp_path: Path) -> None:
    """A CIFAR-style ResNet stores its head as ``linear``; torchvision calls it ``fc``."""
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18().state_dict()
    sd = {"module." + k.replace("fc.", "linear.", 1): v for k, v in r18.items()}
    torch.save(sd, src := tmp_path / "cifar.pth")
    _code, data = diff_json(src, *R18, "--suggest")
    s = data["suggestion"]
    assert s["rules"] == {"strip_prefix": ["module."], "regex": [[r"^linear\.", "fc."]]}
    assert s["matched_after"] == len(r18) and s["missing_after"] == []
    assert {"rule": r"--regex '^linear\.' fc.", "matches": 2, "kind": "rule"} in s["proposals"]
    out = tmp_path / "fixed.safetensors"
    result = cli_run_clean(
        "remap", src, "-o", out, "--strip-prefix", "module.", "--regex", r"^linear\.", "fc.", *R18
    )
    assert_ok(result)
    assert raw(load_file(str(out))["fc.weight"]) == raw(r18["fc.weight"])


def test_never_suggests_dropping_every_key(tmp_path: Path) -> None:
    """Nothing of the checkpoint fits: no rule set (a ``--drop 'module.*'`` would make a
    command that fails on an empty output)."""
    sd = {
        "module.linear.weight": torch.zeros(3, 7),
        "module.linear.bias": torch.zeros(3),
        "module.proj.weight": torch.zeros(5, 5),
    }
    torch.save(sd, src := tmp_path / "other.pth")
    code, data = diff_json(src, *R18, "--suggest")
    assert code == 1
    s = data["suggestion"]
    assert s["rules"] is None and s["command"] is None
    assert any("drop every key" in n for n in s["notes"])
    result = cli_run_clean("diff", src, *R18, "--suggest")
    assert "ckptsurgery remap" not in result.stdout and "--drop" not in result.stdout


@pytest.mark.parametrize(
    ("names", "chosen"),
    [(("student", "teacher"), "teacher"), (("model", "model_ema"), "model_ema")],
)
def test_several_state_dicts_are_matched_and_one_recommended(
    tmp_path: Path, names: tuple[str, str], chosen: str
) -> None:
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18().state_dict()
    first, second = names
    ckpt = {
        first: {"module." + k: v for k, v in r18.items()},
        second: {"module." + k: v.clone() for k, v in r18.items()},
        "epoch": 3,
    }
    torch.save(ckpt, src := tmp_path / "two.pth")
    code, data = diff_json(src, *R18, "--suggest")
    assert code == 1
    assert [c["key"] for c in data["candidates"]] == [first, second]
    assert all(c["fits"] and c["matched_with_rules"] == len(r18) for c in data["candidates"])
    assert data["recommended"]["key"] == chosen
    assert "EMA / teacher" in data["recommended"]["reason"]
    s = data["suggestion"]
    assert s["rules"] == {"strip_prefix": ["module."]}
    assert f"--key {chosen}" in s["command"]

    result = cli_run_clean("diff", src, *R18, "--suggest")
    assert f"using --key {chosen}" in result.stdout
    assert first in result.stdout and second in result.stdout

    # without --suggest the choice stays the user's (exit 2), with the hint on the EMA copy
    result = cli_run_clean("diff", src, *R18)
    assert result.exit_code == 2 and f"e.g. --key {chosen}" in result.stderr


def test_a_candidate_that_fits_better_wins(tmp_path: Path) -> None:
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18().state_dict()
    ckpt = {
        "model": dict(r18),
        "model_ema": {k: v for k, v in r18.items() if not k.startswith("layer4.")},
    }
    torch.save(ckpt, src := tmp_path / "two.pth")
    code, data = diff_json(src, *R18, "--suggest")
    assert code == 0  # "model" fits as it is
    assert data["recommended"]["key"] == "model"
    assert "the most model keys" in data["recommended"]["reason"]


def test_emit_recipe_when_no_rule_is_needed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18().state_dict()
    torch.save({"state_dict": r18, "optimizer": {"lr": 0.1}}, src := tmp_path / "plain.pth")
    recipe = tmp_path / "plain.toml"
    result = cli_run_clean("diff", src, *R18, "--suggest", "--emit-recipe", recipe)
    assert_ok(result)
    assert "[[source]]" in recipe.read_text()  # no rules: the source and the output
    assert_ok(cli_run_clean("apply", recipe))
    written = load_file(str(tmp_path / "plain_remapped.safetensors"))
    assert set(written) == set(r18)
    assert all(raw(written[k]) == raw(v) for k, v in r18.items())


def test_emit_recipe_with_several_state_dicts_names_the_key(tmp_path: Path) -> None:
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18().state_dict()
    torch.save({"student": dict(r18), "teacher": dict(r18)}, src := tmp_path / "dino.pth")
    recipe = tmp_path / "dino.toml"
    result = cli_run_clean("diff", src, *R18, "--suggest", "--emit-recipe", recipe)
    assert_ok(result)
    assert re.search(r'^key = "teacher"$', recipe.read_text(), re.M)
    assert_ok(cli_run_clean("apply", recipe))


def test_candidates_alike_without_an_ema_name_are_left_to_the_user(tmp_path: Path) -> None:
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18().state_dict()
    torch.save({"left": dict(r18), "right": dict(r18)}, src := tmp_path / "two.pth")
    result = cli_run_clean("diff", src, *R18, "--suggest")
    assert result.exit_code == 2
    assert "left 122 of 122" in result.stderr and "choose one with --key" in result.stderr


def test_emitted_recipe_with_an_adapter_applies_it(tmp_path: Path) -> None:
    """The adapters a suggestion proposes are [[adapt]] tables of the emitted recipe: the
    recipe applies, and its output loads into the model strictly."""
    import tomllib

    torch.manual_seed(0)
    r18 = torchvision.models.resnet18().state_dict()
    torch.save({"module." + k: v for k, v in r18.items()}, src := tmp_path / "dp.pth")
    model = (*R18, "--model-arg", "num_classes=10")
    recipe = tmp_path / "dp.toml"
    result = cli_run_clean("diff", src, *model, "--suggest", "--emit-recipe", recipe)
    assert result.exit_code == 1
    assert "--rows 'fc.*' 0-9" in result.stdout
    adapt = tomllib.loads(recipe.read_text())["adapt"]
    assert [(a["op"], a["key"]) for a in adapt] == [("rows", "fc.*")]
    assert_ok(cli_run_clean("apply", recipe))
    written = load_file(str(tmp_path / "dp_remapped.safetensors"))
    assert set(written) == set(r18)
    assert torch.equal(written["fc.weight"], r18["fc.weight"][:10])
    assert torch.equal(written["fc.bias"], r18["fc.bias"][:10])
    torchvision.models.resnet18(num_classes=10).load_state_dict(written, strict=True)
