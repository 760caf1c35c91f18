"""group_keys: compact, exact, deterministic renderings of key lists."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from ckptsurgery.keygroups import expand_group, group_keys


def expand_all(groups: list[str]) -> list[str]:
    return [key for g in groups for key in expand_group(g)]


def test_module_tensors_share_one_pattern_names_sorted() -> None:
    keys = ["layer1.0.conv1.weight", "layer1.0.conv1.bias"]
    assert group_keys(keys) == ["layer1.0.conv1.{bias, weight}"]


def test_numbered_blocks_collapse_to_a_range() -> None:
    keys = [f"blocks.{i}.attn.qkv.weight" for i in range(12)]
    assert group_keys(keys) == ["blocks.{0..11}.attn.qkv.weight"]


def test_non_contiguous_numbers_are_listed() -> None:
    assert group_keys(["a.0.w", "a.1.w", "a.3.w"]) == ["a.{0, 1, 3}.w"]
    assert group_keys([f"a.{i}.w" for i in (0, 1, 2, 3, 5, 7, 8, 9)]) == ["a.{0..3, 5, 7..9}.w"]


def test_numbered_stems_collapse() -> None:
    keys = [
        f"encoder.layers.encoder_layer_{i}.ln_{j}.{p}"
        for i in range(3)
        for j in (1, 2)
        for p in ("weight", "bias")
    ]
    assert group_keys(keys) == ["encoder.layers.encoder_layer_{0..2}.ln_{1, 2}.{bias, weight}"]


def test_different_stems_are_not_collapsed_together() -> None:
    assert group_keys(["m.conv1.w", "m.bn1.w"]) == ["m.conv1.w", "m.bn1.w"]


def test_blocks_with_different_contents_stay_apart() -> None:
    keys = ["blocks.0.qkv.weight", "blocks.0.qkv.bias", "blocks.1.qkv.weight"]
    groups = group_keys(keys)
    assert groups == ["blocks.0.qkv.{bias, weight}", "blocks.1.qkv.weight"]


def test_order_follows_first_key_of_each_group() -> None:
    keys = ["z.weight", "a.weight", "z.bias", "m.0.w", "m.1.w"]
    assert group_keys(keys) == ["z.{bias, weight}", "a.weight", "m.{0, 1}.w"]


def test_resnet18_keys_are_short_and_exact() -> None:
    keys = ["conv1.weight"]
    keys += [f"bn1.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
    for layer in range(1, 5):
        for block in range(2):
            for i in (1, 2):
                keys.append(f"layer{layer}.{block}.conv{i}.weight")
                keys += [f"layer{layer}.{block}.bn{i}.{p}" for p in ("weight", "bias")]
    keys += ["fc.weight", "fc.bias"]
    assert group_keys(keys) == [
        "conv1.weight",
        "bn1.{bias, running_mean, running_var, weight}",
        "layer{1..4}.{0, 1}.conv{1, 2}.weight",
        "layer{1..4}.{0, 1}.bn{1, 2}.{bias, weight}",
        "fc.{bias, weight}",
    ]


def test_duplicates_and_empty_input() -> None:
    assert group_keys([]) == []
    assert group_keys(["a", "a", "b.c", "b.c"]) == ["a", "b.c"]


def test_leading_zeros_are_names_not_numbers() -> None:
    groups = group_keys(["x.01.w", "x.02.w", "x.1.w"])
    assert sorted(expand_all(groups)) == ["x.01.w", "x.02.w", "x.1.w"]
    assert groups == ["x.01.w", "x.02.w", "x.1.w"]  # "01" is a name: nothing to collapse


def test_keys_that_cannot_be_written_unambiguously_pass_through() -> None:
    keys = ["a{b}.w", "a,b.w", "a..b", ".a", "a b.w", "c.w", "c.v"]
    assert group_keys(keys) == ["a{b}.w", "a,b.w", "a..b", ".a", "a b.w", "c.{v, w}"]


def test_expand_group_inverts_the_rendering() -> None:
    assert expand_group("layer{1..3}.{0, 2}.w") == [
        "layer1.0.w",
        "layer1.2.w",
        "layer2.0.w",
        "layer2.2.w",
        "layer3.0.w",
        "layer3.2.w",
    ]
    assert expand_group("plain.key") == ["plain.key"]


segment = st.sampled_from(
    ["a", "b", "conv1", "conv2", "conv10", "0", "1", "2", "3", "11", "x_3", "bias", "weight", "01"]
)
key = st.lists(segment, min_size=1, max_size=5).map(".".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(key, max_size=60))
def test_every_key_is_recovered_exactly_once(keys: list[str]) -> None:
    groups = group_keys(keys)
    expanded = expand_all(groups)
    assert Counter(expanded) == Counter(dict.fromkeys(keys, 1))
    assert len(groups) <= len(set(keys))
    # Deterministic, and the same whatever the order of repeated keys.
    assert group_keys(keys) == groups
    assert group_keys(keys + keys) == groups


@settings(max_examples=100, deadline=None)
@given(st.lists(key, min_size=1, max_size=40))
def test_groups_come_in_order_of_first_appearance(keys: list[str]) -> None:
    groups = group_keys(keys)
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    starts = [min(first[k] for k in expand_group(g)) for g in groups]
    assert starts == sorted(starts)
