"""The dry run's plan table, grouped as ``diff`` groups keys: one row per set of tensors renamed
alike, and rows that expand back to exactly the plan's renames."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from conftest import cli_run
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptsurgery as cs
from ckptsurgery.io.memory import TensorDictSource
from ckptsurgery.keygroups import expand_group
from ckptsurgery.plan.build import build_plan
from ckptsurgery.plan.model import Plan
from ckptsurgery.plan.table import plan_table


def encoder(prefix: str = "module.") -> dict[str, torch.Tensor]:
    sd = {f"{prefix}embeddings.weight": torch.zeros(50, 16)}
    for i in range(6):
        sd[f"{prefix}layer.{i}.weight"] = torch.zeros(16, 16)
        sd[f"{prefix}layer.{i}.bias"] = torch.zeros(16)
    sd[f"{prefix}norm.weight"] = torch.zeros(16)
    sd[f"{prefix}norm.bias"] = torch.zeros(16)
    return sd


def remap_plan(sd: dict[str, torch.Tensor], rules: cs.Rules) -> Plan:
    return build_plan([TensorDictSource(sd)], [rules], mode="remap")


def rows(text: str) -> list[list[str]]:
    """The table's body, each row's cells (columns are two or more spaces apart)."""
    return [re.split(r"\s{2,}", line) for line in text.splitlines()[2:]]


def expanded_pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for cells in rows(text):
        old, new = expand_group(cells[0]), expand_group(cells[2])
        assert len(old) == len(new), cells
        pairs += zip(old, new, strict=True)
    return pairs


def test_keys_renamed_alike_share_a_row() -> None:
    plan = remap_plan(encoder(), cs.Rules(strip_prefix=["module."], replace=[("layer.", "block.")]))
    assert rows(plan_table(plan, group=True)) == [
        ["module.embeddings.weight", "->", "embeddings.weight", "copy", "[50, 16]", "float32", "3.1 KiB"],
        ["module.layer.{0..5}.weight", "->", "block.{0..5}.weight", "copy", "[16, 16]", "float32", "6.0 KiB"],
        ["module.layer.{0..5}.bias", "->", "block.{0..5}.bias", "copy", "[16]", "float32", "384 B"],
        ["module.norm.{bias, weight}", "->", "norm.{bias, weight}", "copy", "[16]", "float32", "128 B"],
    ]  # fmt: skip
    # ungrouped: one row per tensor, as before
    assert len(rows(plan_table(plan))) == 15


def test_unchanged_keys_and_an_added_prefix() -> None:
    plan = remap_plan(encoder(prefix=""), cs.Rules(add_prefix="bert.", keep=["layer.*"]))
    assert [c[:3] for c in rows(plan_table(plan, group=True))] == [
        ["layer.{0..5}.weight", "->", "bert.layer.{0..5}.weight"],
        ["layer.{0..5}.bias", "->", "bert.layer.{0..5}.bias"],
    ]
    same = remap_plan(encoder(prefix=""), cs.Rules(drop=["embeddings.*"]))
    assert [c[:3] for c in rows(plan_table(same, group=True))] == [
        ["layer.{0..5}.weight", "==", "layer.{0..5}.weight"],
        ["layer.{0..5}.bias", "==", "layer.{0..5}.bias"],
        ["norm.{bias, weight}", "==", "norm.{bias, weight}"],
    ]


_part = st.sampled_from(["a", "b", "layer", "0", "1", "2", "10", "x1", "x2", "w", "bias"])
_keys = st.lists(
    st.lists(_part, min_size=1, max_size=4).map(".".join), min_size=1, max_size=25, unique=True
)


@settings(max_examples=150, deadline=None)
@given(
    keys=_keys,
    strip=st.sampled_from(["", "a.", "layer."]),
    replace=st.sampled_from([(), (("1", "one"),), ((".0.", ".zero."),)]),
    add=st.sampled_from(["", "m."]),
    shapes=st.lists(st.sampled_from([(1,), (2,), (2, 2)]), min_size=25, max_size=25),
)
def test_grouped_rows_expand_to_exactly_the_renames(
    keys: list[str],
    strip: str,
    replace: tuple[tuple[str, str], ...],
    add: str,
    shapes: list[tuple[int, ...]],
) -> None:
    sd = {k: torch.zeros(s) for k, s in zip(keys, shapes, strict=False)}
    rules = cs.Rules(strip_prefix=[strip] if strip else [], replace=replace, add_prefix=add)
    try:
        plan = remap_plan(sd, rules)
    except cs.CheckpointError:
        return  # the rules make two keys collide
    pairs = expanded_pairs(plan_table(plan, group=True))
    assert sorted(pairs) == sorted((e.inputs[0].key, e.name) for e in plan.entries)
    assert len(pairs) == len(set(pairs))


def test_remap_dry_run_prints_the_grouped_table(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "enc.safetensors"
    save_file({**encoder(), "module.head.weight": torch.zeros(3, 16)}, src)
    result = cli_run(
        "remap", src, "-o", tmp_path / "o.safetensors", "--dry-run",
        "--strip-prefix", "module.", "--drop", "module.head.*",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "module.layer.{0..5}.weight  ->  layer.{0..5}.weight" in result.stdout
    assert "module.norm.{bias, weight}  ->  norm.{bias, weight}" in result.stdout
    assert "module.layer.0.weight" not in result.stdout
    assert "15 tensors, 9.6 KiB to write" in result.stdout  # the summary
    assert "would keep 15 of 16 keys (15 renamed), drop 1" in result.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_keys_that_cannot_be_grouped_keep_a_row_of_their_own() -> None:
    sd = {
        "module.odd..key": torch.zeros(1),
        "module.a{1}": torch.zeros(1),
        "module.b": torch.zeros(1),
    }
    plan = remap_plan(sd, cs.Rules(strip_prefix=["module."]))
    assert [c[:3] for c in rows(plan_table(plan, group=True))] == [
        ["module.odd..key", "->", "odd..key"],
        ["module.a{1}", "->", "a{1}"],
        ["module.b", "->", "b"],
    ]


def test_a_plan_of_several_sources_groups_each_sources_keys() -> None:
    """With several sources a grouped row names the source its keys come from (#1, #2; an
    average's #1..#3), and never groups keys of different sources together."""
    a, b = TensorDictSource(encoder()), TensorDictSource(encoder(prefix="other."))
    plan = build_plan([a, b], [cs.Rules(), cs.Rules()], mode="union")
    grouped = rows(plan_table(plan, group=True))
    assert len(grouped) < 30
    by_source: dict[str, set[str]] = {"#1": set(), "#2": set()}
    for cells in grouped:
        source, key = cells[0].split(" ", 1)
        by_source[source].update(expand_group(key))
    assert by_source["#1"] == set(a.infos) and by_source["#2"] == set(b.infos)
    soup = build_plan([a, a, a], [cs.Rules()] * 3, mode="average", weights=(1 / 3,) * 3)
    assert all(c[0].startswith("#1..#3 ") for c in rows(plan_table(soup, group=True)))


def test_each_grouped_row_counts_its_own_bytes() -> None:
    """Keys left as they are, of one shape, fall into several rows: each row shows the bytes
    of its own tensors (not of every tensor of that shape), and the rows add up to the plan's
    total."""
    plan = remap_plan(encoder(prefix=""), cs.Rules())
    body = rows(plan_table(plan, group=True))
    sizes = {cells[0]: cells[6] for cells in body}
    assert sizes["layer.{0..5}.bias"] == "384 B"  # 6 x 16 float32
    assert sizes["norm.{bias, weight}"] == "128 B"  # 2 x 16 float32
    units = {"B": 1, "KiB": 1024}
    total = sum(float(n) * units[u] for n, u in (s.split() for s in sizes.values()))
    assert abs(total - plan.total_bytes) < 0.01 * plan.total_bytes  # shown to 0.1 KiB
