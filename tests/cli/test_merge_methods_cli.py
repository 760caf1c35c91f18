"""`ckptsurgery merge --method ... --base BASE`: three real fine-tunes of a tiny net merged
through the CLI agree with the reference (tests/conftest.py) tensor by tensor and load
strictly; the dry run, JSON, provenance, recipes and bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    assert_error,
    assert_ok,
    cli_run,
    method_reference_dict,
    raw,
    safetensors_header,
)
from safetensors.torch import load_file, save_file
from torch import nn


class Net(nn.Module):
    """Conv, BatchNorm (its int64 counter included) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))


def fine_tune(base: Net, seed: int, steps: int = 4) -> dict[str, torch.Tensor]:
    """``base`` trained a few SGD steps on data of its own (seed): a real fine-tune."""
    torch.manual_seed(seed)
    net = copy.deepcopy(base)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A base (safetensors) and three fine-tunes of it: two torch files and a safetensors."""
    folder = tmp_path_factory.mktemp("finetunes")
    torch.manual_seed(0)
    base = Net()
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    tunes = [fine_tune(base, seed) for seed in (1, 2, 3)]
    save_file(base_sd, folder / "base.safetensors")
    torch.save(tunes[0], folder / "a.pt")
    save_file(tunes[1], folder / "b.safetensors")
    torch.save(tunes[2], folder / "c.pth")
    paths = [folder / "a.pt", folder / "b.safetensors", folder / "c.pth"]
    return {"base": folder / "base.safetensors", "paths": paths, "base_sd": base_sd, "tunes": tunes}


CASES = [
    ("task-arithmetic", [], {}),
    ("task-arithmetic", ["--weights", "0.5", "0.3", "-0.2", "--lambda", "0.8"],
     {"weights": [0.5, 0.3, -0.2], "lambda_": 0.8}),
    ("ties", ["--density", "0.5"], {"density": 0.5}),
    ("ties", ["--density", "0.3", "--weights", "1", "0.5", "0.25", "--lambda", "1.2"],
     {"density": 0.3, "weights": [1, 0.5, 0.25], "lambda_": 1.2}),
    ("dare-linear", ["--density", "0.5", "--seed", "4"], {"density": 0.5, "seed": 4}),
    ("dare-ties", ["--density", "0.6", "--weights", "0.6,0.3,0.1"],
     {"density": 0.6, "weights": [0.6, 0.3, 0.1]}),
    ("dare-ties", ["--density", "0.4", "--normalize"], {"density": 0.4, "normalize": True}),
]  # fmt: skip


@pytest.mark.parametrize(("method", "flags", "params"), CASES)
def test_fine_tunes_merged_by_the_cli_match_the_reference(
    runs: dict[str, Any], tmp_path: Path, method: str, flags: list[str], params: dict[str, Any]
) -> None:
    out = tmp_path / "merged.safetensors"
    result = cli_run("merge", "--method", method, "--base", runs["base"], *runs["paths"],
                     *flags, "-o", out)  # fmt: skip
    assert_ok(result)
    got = load_file(out)
    want = method_reference_dict(method, runs["base_sd"], runs["tunes"], **params)
    assert list(got) == list(want) or sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype, k
        torch.testing.assert_close(got[k], w, rtol=1e-5, atol=1e-6, msg=k)
    # The integer counter is the base's; every float tensor moved.
    assert raw(got["bn.num_batches_tracked"]) == raw(runs["base_sd"]["bn.num_batches_tracked"])
    assert not torch.equal(got["fc.weight"], runs["base_sd"]["fc.weight"])
    net = Net()
    net.load_state_dict(got, strict=True)
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 3)
    summary = result.stderr.splitlines()[-1]
    assert summary.startswith(f"{method}") and "of 3 models into base.safetensors" in summary
    assert "8 tensors merged, 1 copied from the base" in summary


def test_torch_output_and_dtype(runs: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "merged.pt"
    assert_ok(cli_run("merge", "--method", "ties", "--base", runs["base"], *runs["paths"],
                      "--density", "0.5", "--dtype", "bfloat16", "-o", out))  # fmt: skip
    got = torch.load(out, weights_only=True)
    want = method_reference_dict("ties", runs["base_sd"], runs["tunes"], density=0.5)
    for k, w in want.items():
        if w.is_floating_point():
            assert got[k].dtype == torch.bfloat16, k
            torch.testing.assert_close(got[k], w.to(torch.bfloat16), msg=k)
        else:
            assert raw(got[k]) == raw(w)


def test_dare_seed_reproducible_through_the_cli(runs: dict[str, Any], tmp_path: Path) -> None:
    outs = []
    for name, seed in (("one", "5"), ("two", "5"), ("other", "6")):
        out = tmp_path / f"{name}.safetensors"
        assert_ok(cli_run("merge", "--method", "dare-linear", "--base", runs["base"],
                          *runs["paths"], "--density", "0.5", "--seed", seed, "-o", out))  # fmt: skip
        outs.append(load_file(out))
    one, two, other = outs
    assert all(raw(one[k]) == raw(two[k]) for k in one)
    assert any(raw(one[k]) != raw(other[k]) for k in one)


def test_dry_run_shows_the_method_per_key(runs: dict[str, Any]) -> None:
    result = cli_run("merge", "--method", "dare-ties", "--base", runs["base"], *runs["paths"],
                     "--density", "0.5", "--weights", "1", "0.5", "2", "--dry-run")  # fmt: skip
    assert_ok(result)
    rows = [line for line in result.stdout.splitlines() if "fc.weight" in line]
    assert len(rows) == 1
    assert "dare-ties density=0.5 seed=0 weights=1, 0.5, 2" in rows[0]
    assert "#1..#4 fc.weight" in rows[0]
    assert "copy" in next(line for line in result.stdout.splitlines() if "num_batches" in line)
    assert "base" in next(line for line in result.stdout.splitlines() if "base.safetensors" in line)
    assert "nothing written" in result.stderr.splitlines()[-1]
    ties = cli_run("merge", "--method", "ties", "--base", runs["base"], *runs["paths"],
                   "--density", "0.5", "--lambda", "0.7", "--dry-run")  # fmt: skip
    assert_ok(ties)
    assert "ties density=0.5 lambda=0.7" in ties.stdout


def test_json_names_the_method_and_its_parameters(runs: dict[str, Any]) -> None:
    result = cli_run("merge", "--method", "ties", "--base", runs["base"], *runs["paths"],
                     "--density", "0.25", "--json", "--dry-run")  # fmt: skip
    assert_ok(result)
    data = json.loads(result.stdout)
    assert data["mode"] == "method"
    assert data["method"] == {
        "op": "ties",
        "weights": [1.0, 1.0, 1.0],
        "density": 0.25,
        "lambda": 1.0,
        "normalize": True,
    }
    assert data["copied_from_base"] == ["bn.num_batches_tracked"]
    ops = {g["op"]: g for g in data["plan"]["ops"]}
    assert ops["ties"]["count"] == 8 and ops["copy"]["count"] == 1


def test_provenance_records_the_method(runs: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    assert_ok(cli_run("merge", "--method", "dare-linear", "--base", runs["base"], *runs["paths"],
                      "--density", "0.5", "--seed", "9", "--weights", "1", "2", "3", "-o", out))  # fmt: skip
    meta = safetensors_header(out)["__metadata__"]
    how = json.loads(meta["ckptsurgery.merge"])
    assert how == {
        "mode": "method",
        "method": "dare-linear",
        "base": "base.safetensors",
        "weights": [1.0, 2.0, 3.0],
        "density": 0.5,
        "lambda": 1.0,
        "normalize": False,
        "seed": 9,
    }
    assert json.loads(meta["ckptsurgery.plan"])["mode"] == "method"
    names = [s["name"] for s in json.loads(meta["ckptsurgery.sources"])]
    assert names == ["base.safetensors", "a.pt", "b.safetensors", "c.pth"]
    origin = json.loads(meta["ckptsurgery.origin"])
    assert origin[0]["how"] == "dare-linear of the models into the base" and origin[0]["count"] == 8


def test_recipe_round_trip(runs: dict[str, Any], tmp_path: Path) -> None:
    out, recipe = tmp_path / "merged.safetensors", tmp_path / "merge.toml"
    assert_ok(cli_run("merge", "--method", "dare-ties", "--base", runs["base"], *runs["paths"],
                      "--density", "0.5", "--seed", "3", "--lambda", "0.9", "--weights", "1",
                      "0.5", "0.5", "-o", out, "--emit-recipe", recipe))  # fmt: skip
    text = recipe.read_text()
    assert 'method = "dare-ties"' in text and "density = 0.5" in text and "seed = 3" in text
    assert "lambda = 0.9" in text and "weights = [" in text
    first = load_file(out)
    out.unlink()
    assert_ok(cli_run("apply", recipe))
    again = load_file(out)
    assert list(again) == list(first)
    assert all(raw(again[k]) == raw(first[k]) for k in first)
    how = json.loads(safetensors_header(out)["__metadata__"]["ckptsurgery.merge"])
    assert how["method"] == "dare-ties" and how["seed"] == 3 and how["lambda"] == 0.9


def test_recipe_base_may_be_any_source(runs: dict[str, Any], tmp_path: Path) -> None:
    folder = runs["base"].parent
    recipe = tmp_path / "r.toml"
    sources = "".join(f'[[source]]\npath = "{p}"\n\n' for p in [*runs["paths"][:2], runs["base"],
                                                                 runs["paths"][2]])  # fmt: skip
    recipe.write_text(
        f'{sources}[merge]\nmethod = "ties"\nbase = "{folder / "base.safetensors"}"\n'
        f'density = 0.5\n\n[output]\npath = "{tmp_path / "out.safetensors"}"\n'
    )
    assert_ok(cli_run("apply", recipe))
    got = load_file(tmp_path / "out.safetensors")
    want = method_reference_dict("ties", runs["base_sd"], runs["tunes"], density=0.5)
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    ("merge", "fragment"),
    [
        ('method = "ties"\nbase = "nope.safetensors"\ndensity = 0.5', "is not the path of a"),
        ('method = "ties"\nbase = "BASE"', "ties needs a density"),
        ('method = "task-arithmetic"\nbase = "BASE"\ndensity = 0.5', "density does not apply"),
        ('method = "ties"\nbase = "BASE"\ndensity = 0.5\nweights = [1, 2]', "2 weights for 3"),
        ('method = "lerp"\nbase = "BASE"', '("lerp") is not allowed'),
        ('method = "ties"\nbase = "BASE"\ndensity = 0.5\nweights = 2', "must be a list of"),
        ('method = "ties"\nbase = "BASE"\ndensity = "half"', "density 'half' is not a number"),
        ('method = "dare-ties"\nbase = "BASE"\ndensity = 0.5\nseed = 1.5', "seed 1.5 is not"),
        ('base = "BASE"\ndensity = 0.5', "applies only with method"),
        ('method = "ties"\nbase = "BASE"\ndensity = 0.5\naverage = true', "does not apply with"),
    ],
)
def test_recipe_errors(runs: dict[str, Any], tmp_path: Path, merge: str, fragment: str) -> None:
    recipe = tmp_path / "r.toml"
    out = tmp_path / "out.safetensors"
    sources = "".join(f'[[source]]\npath = "{p}"\n\n' for p in [runs["base"], *runs["paths"]])
    merge = merge.replace("BASE", str(runs["base"]))
    recipe.write_text(f'{sources}[merge]\n{merge}\n\n[output]\npath = "{out}"\n')
    assert_error(cli_run("apply", recipe), fragment)
    assert not out.exists()


def test_bad_input_is_one_error_line_and_nothing_written(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "out.safetensors"
    base, paths = runs["base"], runs["paths"]
    cases: list[tuple[list[Any], str]] = [
        (["--method", "ties", *paths, "--density", "0.5"], "--method needs --base BASE"),
        (["--base", base, *paths], "--base needs --method"),
        (["--method", "ties", "--base", base, *paths, "--density", "0"], "density 0.0 is not in"),
        (["--method", "dare-ties", "--base", base, *paths, "--density", "1.01"], "not in (0, 1]"),
        (["--method", "task-arithmetic", "--base", base, *paths, "--density", "0.5"],
         "density does not apply to task-arithmetic"),
        (["--method", "ties", "--base", base, *paths], "ties needs a density"),
        (["--method", "ties", "--base", base, *paths, "--density", "0.5", "--weights", "1", "2"],
         "2 weights for 3 models"),
        (["--method", "ties", "--base", base, *paths, "--density", "0.5", "--average"],
         "--method and --average"),
        (["--method", "ties", "--base", base, *paths, "--density", "0.5", "--seed", "1"],
         "seed applies to DARE's random drop only"),
    ]  # fmt: skip
    for args, fragment in cases:
        assert_error(cli_run("merge", *args, "-o", out), fragment)
        assert not out.exists()
    # Sources that do not line up with the base: a missing key, a shape that differs.
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in runs["tunes"][0].items() if k != "fc.bias"}, partial)
    assert_error(cli_run("merge", "--method", "ties", "--base", base, partial, paths[1],
                         "--density", "0.5", "-o", out),
                 "cannot merge by ties", "missing from", "fc.bias")  # fmt: skip
    wide = tmp_path / "wide.safetensors"
    save_file({**runs["tunes"][0], "fc.bias": torch.zeros(5)}, wide)
    assert_error(cli_run("merge", "--method", "task-arithmetic", "--base", base, wide,
                         "-o", out), "fc.bias has different shapes")  # fmt: skip
    assert not out.exists()
    assert set(tmp_path.iterdir()) == {partial, wide}
