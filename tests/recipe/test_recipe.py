"""Recipes: parsing (every malformed field its own message), applying, and writing them."""

from __future__ import annotations

import json
import re
import tempfile
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import import_source
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import ckptsurgery as cs
from ckptsurgery.io import parse_size
from ckptsurgery.merge import ON_CONFLICT
from ckptsurgery.recipe import RecipeError, Target, parse_recipe, recipe_toml
from ckptsurgery.recipe.model import DTYPES

NETS = """
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)
"""


@pytest.fixture
def nets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The module ``cs_recipe_nets``, importable as a model spec."""
    yield from import_source(tmp_path, "cs_recipe_nets", NETS, monkeypatch)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def make_inputs(folder: Path, nets: Any, num_classes: int = 5) -> dict[str, torch.Tensor]:
    """A MoCo-like backbone file and a head file with another naming, in ``folder``."""
    torch.manual_seed(0)
    full = nets.TinyNet(num_classes).state_dict()
    moco = {"module.encoder_q." + k: v for k, v in full.items() if not k.startswith("fc.")}
    moco.update({"module.encoder_k." + k: v + 1 for k, v in full.items()})
    torch.save({"epoch": 3, "state_dict": moco}, folder / "moco.pth.tar")
    save_file({"head." + k: v for k, v in full.items() if k.startswith("fc.")}, folder / "head.st")
    return full


RECIPE = """
    # ckptsurgery apply recipe.toml
    [[source]]
    path = "in/moco.pth.tar"
    key = "state_dict"
    keep = ["module.encoder_q.*"]
    strip_prefix = ["module.encoder_q."]

    [[source]]
    path = "in/head.st"
    replace = [["head.fc.", "fc."]]

    [target]
    model = "cs_recipe_nets:TinyNet"
    model_args = { num_classes = 5 }

    [output]
    path = "out/model.safetensors"
"""


def test_recipe_applies_twice_to_the_same_bytes(
    tmp_path: Path, nets: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    full = make_inputs(tmp_path / "in", nets)
    recipe = write(tmp_path / "recipe.toml", RECIPE)
    monkeypatch.chdir(tmp_path / "out")  # paths are the recipe's folder's, not the cwd's
    done = cs.apply_recipe(recipe)
    out = tmp_path / "out" / "model.safetensors"
    first = out.read_bytes()
    assert done.result.written is not None and done.result.compatible
    model = nets.TinyNet(5)
    model.load_state_dict(load_file(out), strict=True)
    for k, v in load_file(out).items():
        assert torch.equal(v, full[k])
    with pytest.raises(cs.OutputError, match="--force"):
        cs.apply_recipe(recipe)
    cs.apply_recipe(recipe, force=True)
    assert out.read_bytes() == first


def test_recipe_provenance(tmp_path: Path, nets: Any) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    make_inputs(tmp_path / "in", nets)
    recipe = write(tmp_path / "recipe.toml", RECIPE)
    cs.apply_recipe(recipe)
    with cs.open_checkpoint(tmp_path / "out" / "model.safetensors") as ckpt:
        from ckptsurgery.describe import provenance

        prov = provenance(ckpt.metadata)
    import hashlib

    assert prov["recipe"] == {
        "name": "recipe.toml",
        "sha256": hashlib.sha256(recipe.read_bytes()).hexdigest(),
    }
    assert prov["target"]["model"] == "cs_recipe_nets:TinyNet"
    assert prov["target"]["model_args"] == {"num_classes": 5}
    assert [s["name"] for s in prov["sources"]] == ["moco.pth.tar", "head.st"]
    assert prov["sources"][0]["rules"] == {
        "keep": ["module.encoder_q.*"],
        "strip_prefix": ["module.encoder_q."],
    }
    assert [(o["name"], o["count"]) for o in prov["origin"]] == [
        ("moco.pth.tar", 7),
        ("head.st", 2),
    ]


def test_recipe_gate_refuses(tmp_path: Path, nets: Any) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    make_inputs(tmp_path / "in", nets)
    text = RECIPE.replace('path = "in/head.st"', 'path = "in/head.st"\ndrop = ["*"]')
    recipe = write(tmp_path / "recipe.toml", text)
    with pytest.raises(cs.IncompatibleCheckpoint, match=r"fc\.\{bias, weight\}") as e:
        cs.apply_recipe(recipe)
    assert e.value.report.missing == ["fc.weight", "fc.bias"]
    assert list((tmp_path / "out").iterdir()) == []
    allowed = text.replace("model_args", 'allow_missing = ["fc.*"]\nmodel_args')
    done = cs.apply_recipe(write(tmp_path / "recipe.toml", allowed))
    assert done.result.written is not None


def test_recipe_dry_run_writes_nothing(tmp_path: Path, nets: Any) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    make_inputs(tmp_path / "in", nets)
    done = cs.apply_recipe(write(tmp_path / "recipe.toml", RECIPE), dry_run=True)
    assert done.result.written is None
    assert done.result.report is not None and done.result.report.compatible
    assert [len(s.keys.renames) for s in done.result.sources] == [7, 2]
    assert list((tmp_path / "out").iterdir()) == []


def test_recipe_average(tmp_path: Path) -> None:
    for i in range(3):
        save_file({"w": torch.full((2,), float(i)), "n": torch.tensor([i])}, tmp_path / f"{i}.st")
    write(
        tmp_path / "soup.toml",
        """
        [[source]]
        path = "0.st"
        [[source]]
        path = "1.st"
        [[source]]
        path = "2.st"
        [merge]
        average = true
        weights = [1, 1, 2]
        [output]
        path = "soup.safetensors"
        """,
    )
    done = cs.apply_recipe(tmp_path / "soup.toml")
    got = load_file(tmp_path / "soup.safetensors")
    assert got["w"].tolist() == [1.25, 1.25]
    assert got["n"].tolist() == [0]
    assert done.result.weights == (0.25, 0.25, 0.5)


def test_recipe_max_shard_size(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, tmp_path / "a.safetensors")
    text = GOOD_SOURCE + "[output]\npath = 'out'\nmax_shard_size = '{}'\n"
    recipe = parse_recipe(text.format("2GiB"), base=tmp_path)
    assert recipe.max_shard_size == 2 * 2**30 and recipe.output == tmp_path / "out"
    assert parse_recipe(text.format("500"), base=tmp_path).max_shard_size == 500
    assert parse_recipe(GOOD_SOURCE + GOOD_OUTPUT, base=tmp_path).max_shard_size is None


def test_recipe_key_default_from_the_caller(tmp_path: Path) -> None:
    torch.save({"a": {"x": torch.zeros(1)}, "b": {"y": torch.zeros(1)}}, tmp_path / "two.pt")
    write(tmp_path / "r.toml", '[[source]]\npath = "two.pt"\n[output]\npath = "o.safetensors"\n')
    with pytest.raises(cs.StateDictSelectionError, match="--key"):
        cs.apply_recipe(tmp_path / "r.toml")
    done = cs.apply_recipe(tmp_path / "r.toml", key="b")
    assert done.result.names == ("y",)


# --- malformed recipes ----------------------------------------------------------------------

GOOD_SOURCE = '[[source]]\npath = "a.safetensors"\n'
GOOD_OUTPUT = '[output]\npath = "out.safetensors"\n'
DTYPE_NAMES = "one of 'float32', 'float16', 'bfloat16'"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (
            GOOD_SOURCE + GOOD_OUTPUT + "[merg]\non_conflict = 'first'\n",
            ["line 5", "[merg]: unknown table (did you mean [merge]?)", "[[source]], [merge]"],
        ),
        (
            'name = "x"\n' + GOOD_SOURCE + GOOD_OUTPUT,
            ["line 1", "name: unknown top-level field", "[output]"],
        ),
        (GOOD_SOURCE, ["[output]: missing", 'path = "OUT.safetensors"']),
        (GOOD_OUTPUT, ["[[source]]: missing", "at least one [[source]]"]),
        (
            '[source]\npath = "a.safetensors"\n' + GOOD_OUTPUT,
            ["line 1", "[[source]]", "double brackets"],
        ),
        ("[[source]]\nkey = 'k'\n" + GOOD_OUTPUT, ["line 1", "[[source]] #1: missing field path"]),
        (
            '[[source]]\npath = "nope.pth"\n' + GOOD_OUTPUT,
            ["line 2", "[[source]] #1 path", "'nope.pth' does not exist", "recipe's folder"],
        ),
        ("[[source]]\npath = 3\n" + GOOD_OUTPUT, ["line 2", "path: must be a file name"]),
        (
            GOOD_SOURCE + "keep = 3\n" + GOOD_OUTPUT,
            ["line 3", "[[source]] #1 keep: must be a list of strings", "an integer (3)"],
        ),
        (
            GOOD_SOURCE + "drop = [1]\n" + GOOD_OUTPUT,
            ["line 3", "drop: must be a list of strings", "an array ([1])"],
        ),
        (
            GOOD_SOURCE + 'replace = ["a", "b"]\n' + GOOD_OUTPUT,
            ["line 3", 'replace: must be a list of ["old", "new"] string pairs'],
        ),
        (
            GOOD_SOURCE + 'regex = [["(", "x"]]\n' + GOOD_OUTPUT,
            ["line 3", "[[source]] #1 regex:", "not a valid regular expression"],
        ),
        (
            GOOD_SOURCE + "add_prefix = []\n" + GOOD_OUTPUT,
            ["line 3", "add_prefix: must be a string"],
        ),
        (
            GOOD_SOURCE + 'strip_prefix = [""]\n' + GOOD_OUTPUT,
            ["line 3", "strip_prefix:", "empty prefix"],
        ),
        (
            GOOD_SOURCE + "kep = ['x']\n" + GOOD_OUTPUT,
            ["line 3", "kep: unknown field (did you mean 'keep'?)", "allowed: path, key, keep"],
        ),
        (GOOD_SOURCE + "key = 1\n" + GOOD_OUTPUT, ["line 3", "key: must be a slash-separated"]),
        (
            GOOD_SOURCE + GOOD_OUTPUT + "[merge]\non_conflict = 'newest'\n",
            ["line 6", "[merge] on_conflict", "'error', 'first', 'last'"],
        ),
        (
            GOOD_SOURCE + GOOD_OUTPUT + "[merge]\naverage = 'yes'\n",
            ["line 6", "[merge] average: must be true or false"],
        ),
        (
            GOOD_SOURCE * 2 + GOOD_OUTPUT + "[merge]\naverage = true\nweights = [1, 2, 3]\n",
            ["line 9", "[merge] weights: 3 weights for 2 [[source]] blocks"],
        ),
        (
            GOOD_SOURCE * 2 + GOOD_OUTPUT + "[merge]\naverage = true\nweights = [1, -2]\n",
            ["[merge] weights: must all be positive"],
        ),
        (
            GOOD_SOURCE * 2 + GOOD_OUTPUT + "[merge]\naverage = true\nweights = ['a', 1]\n",
            ["[merge] weights: must be a list of numbers"],
        ),
        (
            GOOD_SOURCE * 2 + GOOD_OUTPUT + "[merge]\nweights = [1, 2]\n",
            ["[merge] weights: apply only with average = true"],
        ),
        (
            GOOD_SOURCE + GOOD_OUTPUT + "[merge]\naverage = true\n",
            ["[merge] average: needs at least two [[source]] blocks"],
        ),
        (
            GOOD_SOURCE * 2 + GOOD_OUTPUT + "[merge]\naverage = true\non_conflict = 'first'\n",
            ["[merge] on_conflict: does not apply with average = true"],
        ),
        (
            GOOD_SOURCE + GOOD_OUTPUT + "[merge]\nstrategy = 1\n",
            ["[merge] strategy: unknown field", "allowed: on_conflict, average, weights"],
        ),
        (
            GOOD_SOURCE + GOOD_OUTPUT + "[target]\nmodel = 'torchvision:resnet18'\nallow = []\n",
            ["line 7", "[target] allow: unknown field", "allowed: model, model_args"],
        ),
        (
            GOOD_SOURCE + GOOD_OUTPUT + "[target]\nallow_missing = ['fc.*']\n",
            ["line 5", "[target]: missing field model", "torchvision:resnet50"],
        ),
        (
            GOOD_SOURCE + GOOD_OUTPUT + "[target]\nmodel = 'm:f'\nmodel_args = 10\n",
            ["line 7", "[target] model_args: must be a table"],
        ),
        (
            GOOD_SOURCE + GOOD_OUTPUT + "[target]\nmodel = 'm:f'\nallow_missing = [1]\n",
            ["line 7", "[target] allow_missing: must be a list of globs"],
        ),
        (
            GOOD_SOURCE + GOOD_OUTPUT + "[target]\nmodel = 'm:f'\ndrop_mismatched = 1\n",
            ["line 7", "[target] drop_mismatched: must be true or false"],
        ),
        (
            GOOD_SOURCE + "[output]\nformat = 'torch'\n",
            ["line 3", "[output]: missing field path"],
        ),
        (
            GOOD_SOURCE + "[output]\npath = 'out.weights'\n",
            ["line 4", "[output] path: cannot tell the format", 'format = "safetensors"'],
        ),
        (
            GOOD_SOURCE + "[output]\npath = 'o.pt'\nformat = 'onnx'\n",
            ["line 5", "[output] format", "'safetensors', 'torch'"],
        ),
        (
            GOOD_SOURCE + "[output]\npath = 'o.pt'\nfile = 'x'\n",
            ["line 5", "[output] file: unknown field", "allowed: path, format"],
        ),
        (
            GOOD_SOURCE + "[output]\npath = 'o'\nmax_shard_size = 'lots'\n",
            ["line 5", "[output] max_shard_size: 'lots' is not a size", '"5GB"'],
        ),
        (
            GOOD_SOURCE + "[output]\npath = 'o'\nmax_shard_size = true\n",
            ["line 5", "[output] max_shard_size: must be a size", "got a boolean"],
        ),
        (
            GOOD_SOURCE + "[output]\npath = 'o'\nformat = 'torch'\nmax_shard_size = 5\n",
            ["line 6", "[output] max_shard_size: writes safetensors shards", 'format = "torch"'],
        ),
        (  # an array's elements on lines of their own are not taken for table headers
            GOOD_SOURCE
            + 'replace = [\n  ["bn", "norm"],\n  ["x", "y"]\n]\nadd_prefix = 1\n'
            + GOOD_OUTPUT,
            ["line 7", "[[source]] #1 add_prefix: must be a string"],
        ),
        (  # a sub-table's header is its field's line (recipe_toml writes model_args so)
            GOOD_SOURCE + GOOD_OUTPUT + "[target]\nmodel = 'm:f'\n[target.model_args]\n'a b' = 1\n",
            ["line 7", "[target] model_args: 'a b' is not a Python argument name"],
        ),
        (
            GOOD_SOURCE + "[output]\npath = 'o.pt'\ndtype = 'fp16'\n",
            ["line 5", '[output] dtype: a string ("fp16") is not allowed', DTYPE_NAMES],
        ),
        (
            GOOD_SOURCE + "[output]\npath = 'o.pt'\ndtype = 16\n",
            ["line 5", "[output] dtype: an integer (16) is not allowed", DTYPE_NAMES],
        ),
        (
            GOOD_SOURCE + "[output]\npath = 'o.pt'\ndtype = 'float16'\nkeep_dtype = [1]\n",
            ["line 6", "[output] keep_dtype: must be a list of globs", "an array ([1])"],
        ),
        (
            GOOD_SOURCE + "[output]\npath = 'o.pt'\ndtype = 'float16'\nkeep_dtype = ['']\n",
            ["line 6", "[output] keep_dtype: must be a list of globs", 'an array ([""])'],
        ),
        (
            GOOD_SOURCE + "[output]\npath = 'o.pt'\nkeep_dtype = ['*.running_*']\n",
            ["line 5", "[output] keep_dtype: applies only with dtype", DTYPE_NAMES],
        ),
        (
            GOOD_SOURCE + "[output]\npath = 'o.pt'\ndtyp = 'float16'\n",
            ["line 5", "[output] dtyp: unknown field (did you mean 'dtype'?)", "dtype, keep_dtype"],
        ),
        (  # lines are TOML's: split at "\n" only, not at a line separator in a string
            GOOD_SOURCE + 'key = "a\u2028b"\nkeep = 3\n' + GOOD_OUTPUT,
            ["line 4", "[[source]] #1 keep: must be a list of strings"],
        ),
        (GOOD_SOURCE + "[output\n", ["not valid TOML", "line 3"]),
    ],
)
def test_malformed_recipe(tmp_path: Path, text: str, fragments: list[str]) -> None:
    save_file({"x": torch.zeros(1)}, tmp_path / "a.safetensors")
    recipe = write(tmp_path / "bad.toml", text)
    with pytest.raises(RecipeError) as e:
        cs.load_recipe(recipe)
    message = str(e.value)
    assert message.startswith(str(recipe))
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(e.value, cs.CheckpointError)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = """
        [[source]]
        path = "missing.pth"
        keep = 3
        [[source]]
        path = "also_missing.pth"
        [merge]
        on_conflict = "newest"
    """
    with pytest.raises(RecipeError) as e:
        cs.load_recipe(write(tmp_path / "r.toml", text))
    problems = e.value.problems
    assert len(problems) == 5, problems
    assert [p.split(":")[0] for p in problems] == [
        "line 2",
        "line 3",
        "line 5",
        "line 7",
        "[output]",
    ]
    assert str(e.value).startswith(f"{tmp_path / 'r.toml'}: 5 problems: ")


def test_recipe_file_itself_missing(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        cs.load_recipe(tmp_path / "nope.toml")


def test_trust_is_not_read_from_a_recipe(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, tmp_path / "a.safetensors")
    text = GOOD_SOURCE + "unsafe_pickle = true\n" + GOOD_OUTPUT
    with pytest.raises(RecipeError, match="unsafe_pickle: unknown field"):
        cs.load_recipe(write(tmp_path / "r.toml", text))


def test_recipe_output_dtype(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, tmp_path / "a.safetensors")
    text = GOOD_SOURCE + GOOD_OUTPUT
    recipe = parse_recipe(text, base=tmp_path)
    assert recipe.dtype is None and recipe.keep_dtype == ()
    for dtype in ("float32", "float16", "bfloat16"):
        recipe = parse_recipe(text + f'dtype = "{dtype}"\n', base=tmp_path)
        assert recipe.dtype == dtype and recipe.keep_dtype == ()
    keep = 'keep_dtype = ["*.running_*", "*.num_batches_tracked"]\n'
    recipe = parse_recipe(text + 'dtype = "bfloat16"\n' + keep, base=tmp_path)
    assert recipe.dtype == "bfloat16"
    assert recipe.keep_dtype == ("*.running_*", "*.num_batches_tracked")
    # one glob as a string, as allow_missing takes it
    recipe = parse_recipe(text + 'keep_dtype = "*.running_*"\ndtype = "float16"\n', base=tmp_path)
    assert recipe.keep_dtype == ("*.running_*",)


def test_recipe_bad_dtype_is_one_problem_even_with_keep_dtype(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, tmp_path / "a.safetensors")
    text = GOOD_SOURCE + GOOD_OUTPUT + "dtype = 'int8'\nkeep_dtype = ['*.running_*']\n"
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, base=tmp_path, name="r.toml")
    assert e.value.problems == (
        'line 5: [output] dtype: a string ("int8") is not allowed; use ' + DTYPE_NAMES,
    )


# --- writing recipes ------------------------------------------------------------------------


def test_recipe_toml_round_trips(tmp_path: Path) -> None:
    (tmp_path / "ckpts").mkdir()
    save_file({"x": torch.zeros(1)}, tmp_path / "ckpts" / "a.safetensors")
    rules = cs.Rules(
        keep=["module.*"],
        drop=['a"b\\c'],
        strip_prefix=["module."],
        replace=[("bn", "norm")],
        regex=[(r"^blocks\.(\d+)", r"layers.\1")],
        add_prefix="m.",
    )
    target = Target(
        model="torchvision:resnet50",
        model_args={"num_classes": 10, "dims": (1, 2), "name": "x y", "scale": 0.5},
        allow_missing=("fc.*",),
    )
    text = recipe_toml(
        [(tmp_path / "ckpts" / "a.safetensors", None, rules)],
        target,
        tmp_path / "out.safetensors",
    )
    recipe = parse_recipe(text, base=tmp_path / "elsewhere")
    assert recipe.sources[0].rules == rules
    assert recipe.sources[0].path == tmp_path / "ckpts" / "a.safetensors"
    assert recipe.target == Target(
        model="torchvision:resnet50",
        model_args={"num_classes": 10, "dims": [1, 2], "name": "x y", "scale": 0.5},
        allow_missing=("fc.*",),
    )
    assert recipe.output == tmp_path / "out.safetensors"
    assert text.startswith("# ckptsurgery apply")


def test_recipe_toml_paths_relative_to_the_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "recipes").mkdir()
    save_file({"x": torch.zeros(1)}, tmp_path / "ckpts" / "a.safetensors")
    monkeypatch.chdir(tmp_path)
    text = recipe_toml(
        [("ckpts/a.safetensors", "state", cs.Rules())],
        None,
        "out.safetensors",
        recipe_dir="recipes",
    )
    data = tomllib.loads(text)
    assert data["source"] == [{"path": "../ckpts/a.safetensors", "key": "state"}]
    assert data["output"] == {"path": "../out.safetensors"}
    write(tmp_path / "recipes" / "r.toml", text)
    recipe = cs.load_recipe(tmp_path / "recipes" / "r.toml")
    assert recipe.sources[0].path.resolve() == (tmp_path / "ckpts" / "a.safetensors").resolve()


@pytest.mark.parametrize("value", [None, object(), [1, None], {"a": None}])
def test_recipe_toml_refuses_model_args_toml_cannot_hold(value: object) -> None:
    with pytest.raises(
        RecipeError, match=r"model argument w=.* cannot be written in TOML \(no None"
    ):
        recipe_toml([("a.pt", None, cs.Rules())], Target("m:f", {"w": value}), "o.pt")


@given(st.lists(st.text(min_size=1), min_size=1, max_size=4), st.text())
def test_recipe_toml_strings_round_trip(globs: list[str], prefix: str) -> None:
    rules = cs.Rules(keep=globs, add_prefix=prefix)
    text = recipe_toml([("a.pt", None, rules)], None, "o.pt")
    data = tomllib.loads(text)
    assert data["source"][0]["keep"] == globs
    assert data["source"][0].get("add_prefix", "") == prefix
    assert json.loads(json.dumps(data))  # plain data


# Text that TOML must quote or escape: quotes, backslashes, control characters, newlines,
# TOML's own punctuation and characters beyond ASCII (and neither "/" nor NUL: these are also
# file names).
TRICKY = st.text(st.sampled_from(list("aZ09 _-.*#=[]{}\"'\\\n\r\t\x01\x7fé☃🙂\u2028")), max_size=8)
GLOBS = st.lists(TRICKY.map(lambda t: "g" + t), max_size=3)
ARG_VALUES = st.recursive(
    st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | TRICKY,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TRICKY, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def recipe_args(draw: st.DrawFn) -> dict[str, Any]:
    """recipe_toml's arguments, every one of them, with values parse_recipe accepts."""
    names = draw(st.lists(TRICKY.map(lambda t: "src" + t), min_size=1, max_size=3, unique=True))
    sources = []
    for name in names:
        rules = cs.Rules(
            keep=draw(GLOBS),
            drop=draw(GLOBS),
            strip_prefix=draw(GLOBS),
            replace=draw(st.lists(st.tuples(TRICKY.map(lambda t: "r" + t), TRICKY), max_size=2)),
            regex=[(re.escape(p), "x" + p.replace("\\", "")) for p in draw(GLOBS)],
            add_prefix=draw(TRICKY),
        )
        sources.append((name, draw(st.none() | TRICKY.map(lambda t: "k" + t)), rules))
    average = len(sources) > 1 and draw(st.booleans())
    weights = (
        draw(st.lists(st.floats(1e-6, 1e6), min_size=len(sources), max_size=len(sources)))
        if average and draw(st.booleans())
        else []
    )
    target = draw(
        st.none()
        | st.builds(
            Target,
            model=TRICKY.map(lambda t: "m" + t),
            model_args=st.dictionaries(st.sampled_from(["num_classes", "é", "_x"]), ARG_VALUES),
            allow_missing=GLOBS.map(tuple),
            allow_unexpected=GLOBS.map(tuple),
            drop_mismatched=st.booleans(),
        )
    )
    fmt = draw(st.sampled_from([None, "safetensors", "torch"]))
    shard = st.integers(1, 10**13) | st.sampled_from(["5GB", "500MB", "2GiB", "1048576"])
    dtype = draw(st.none() | st.sampled_from(DTYPES))
    return {
        "sources": sources,
        "target": target,
        "output": "out" + draw(TRICKY) + ".safetensors",
        "on_conflict": "error" if average else draw(st.sampled_from(ON_CONFLICT)),
        "average": average,
        "weights": weights,
        "format": fmt,
        "max_shard_size": None if fmt == "torch" else draw(st.none() | shard),
        "dtype": dtype,
        "keep_dtype": draw(GLOBS) if dtype else [],
    }


@settings(max_examples=60, deadline=None)
@given(recipe_args())
def test_recipe_toml_round_trips_every_argument(args: dict[str, Any]) -> None:
    text = recipe_toml(**args)
    assert text.startswith("# ckptsurgery apply RECIPE.toml   (made for src")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for name, _, _ in args["sources"]:
            (base / name).touch()  # a source must exist; it is not read
        recipe = parse_recipe(text, base=base)
    assert [(s.path, s.key, s.rules) for s in recipe.sources] == [
        (base / name, key, rules) for name, key, rules in args["sources"]
    ]
    assert recipe.on_conflict == args["on_conflict"]
    assert recipe.average == args["average"]
    assert recipe.weights == tuple(args["weights"])
    assert recipe.target == args["target"]
    assert recipe.output == base / args["output"]
    assert recipe.format == args["format"]
    size = args["max_shard_size"]
    assert recipe.max_shard_size == (None if size is None else parse_size(size))
    assert recipe.dtype == args["dtype"]
    assert recipe.keep_dtype == tuple(args["keep_dtype"])
    # and only what differs from the defaults is written
    data = tomllib.loads(text)
    assert ("merge" in data) == (args["on_conflict"] != "error" or args["average"])
    assert set(data["output"]) == {"path"} | {
        k for k in ("format", "max_shard_size", "dtype") if args[k] is not None
    } | ({"keep_dtype"} if args["keep_dtype"] else set())
