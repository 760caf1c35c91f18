"""Rules: the fixed order, globs, counts, collisions, construction, TOML files, properties."""

from __future__ import annotations

import dataclasses
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ckptsurgery as cs
from ckptsurgery import CheckpointError, KeyCollisionError, RuleError, Rules

MOCO_KEYS = [
    "module.encoder_q.conv1.weight",
    "module.encoder_q.layer1.0.bn1.running_mean",
    "module.encoder_q.fc.0.weight",
    "module.encoder_q.fc.2.bias",
    "module.encoder_k.conv1.weight",
    "module.encoder_k.fc.0.weight",
    "queue",
]


def renames(rules: Rules, keys: list[str]) -> dict[str, str]:
    return rules.plan(keys).mapping


# -- the order of the rules -------------------------------------------------------------------


def test_moco_backbone_rules() -> None:
    rules = Rules(
        keep=["module.encoder_q.*"],
        drop=["module.encoder_q.fc.*"],
        strip_prefix=["module.encoder_q."],
    )
    plan = rules.plan(MOCO_KEYS)
    assert plan.renames == (
        ("module.encoder_q.conv1.weight", "conv1.weight"),
        ("module.encoder_q.layer1.0.bn1.running_mean", "layer1.0.bn1.running_mean"),
    )
    assert plan.dropped == (
        "module.encoder_q.fc.0.weight",
        "module.encoder_q.fc.2.bias",
        "module.encoder_k.conv1.weight",
        "module.encoder_k.fc.0.weight",
        "queue",
    )


def test_keep_runs_before_drop() -> None:
    # drop wins over keep: a key both kept and dropped is dropped
    rules = Rules(keep=["a.*"], drop=["a.b*"])
    assert renames(rules, ["a.x", "a.b", "c.x"]) == {"a.x": "a.x"}


def test_keep_with_several_globs_is_a_union() -> None:
    rules = Rules(keep=["a.*", "b.*"])
    plan = rules.plan(["a.1", "b.1", "c.1", "ab.1"])
    assert [o for o, _ in plan.renames] == ["a.1", "b.1"]
    assert plan.dropped == ("c.1", "ab.1")


def test_drop_with_several_globs_removes_any_match() -> None:
    plan = Rules(drop=["a.*", "*.bias"]).plan(["a.w", "b.bias", "b.w"])
    assert plan.dropped == ("a.w", "b.bias")
    assert plan.mapping == {"b.w": "b.w"}


def test_strip_prefix_is_sequential_in_the_order_given() -> None:
    rules = Rules(strip_prefix=["module.", "encoder_q."])
    assert renames(rules, ["module.encoder_q.conv.w"]) == {"module.encoder_q.conv.w": "conv.w"}
    # in the other order the second prefix is not there yet when the first one is tried
    rules = Rules(strip_prefix=["encoder_q.", "module."])
    assert renames(rules, ["module.encoder_q.conv.w"]) == {
        "module.encoder_q.conv.w": "encoder_q.conv.w"
    }


def test_strip_prefix_only_strips_a_leading_prefix_once() -> None:
    rules = Rules(strip_prefix=["m."])
    assert renames(rules, ["m.m.w", "x.m.w"]) == {"m.m.w": "m.w", "x.m.w": "x.m.w"}


def test_replace_runs_in_order_after_strip() -> None:
    rules = Rules(strip_prefix=["backbone."], replace=[("a", "b"), ("b", "c")])
    # strip first (so "backbone." is not touched by the replaces), then a->b, then b->c
    assert renames(rules, ["backbone.ab"]) == {"backbone.ab": "cc"}
    rules = Rules(replace=[("b", "c"), ("a", "b")])
    assert renames(rules, ["ab"]) == {"ab": "bc"}


def test_replace_is_a_plain_substring_replacement() -> None:
    rules = Rules(replace=[(".", "_")])
    assert renames(rules, ["a.b.c"]) == {"a.b.c": "a_b_c"}


def test_regex_runs_in_order_after_replace() -> None:
    rules = Rules(
        replace=[("blocks", "layers")],
        regex=[(r"^layers\.(\d+)\.", r"layer\1."), (r"layer(\d)", r"L\1")],
    )
    assert renames(rules, ["blocks.3.attn.w"]) == {"blocks.3.attn.w": "L3.attn.w"}


def test_regex_sees_the_result_of_strip_and_replace() -> None:
    # the ^ anchor only matches because strip_prefix ran first
    rules = Rules(strip_prefix=["model."], regex=[(r"^enc", "encoder")])
    assert renames(rules, ["model.enc.w"]) == {"model.enc.w": "encoder.w"}


def test_add_prefix_runs_last() -> None:
    rules = Rules(strip_prefix=["a."], regex=[(r"^b", "B")], add_prefix="b.")
    # if add_prefix ran before the regex, the key would become "B.b.x"
    assert renames(rules, ["a.b.x"]) == {"a.b.x": "b.B.x"}


def test_add_prefix_is_added_to_every_key_even_one_that_has_it() -> None:
    rules = Rules(add_prefix="model.")
    assert renames(rules, ["model.a", "b"]) == {"model.a": "model.model.a", "b": "model.b"}


def test_globs_match_the_original_key() -> None:
    # drop sees "module.fc.w", not the stripped "fc.w"
    rules = Rules(drop=["fc.*"], strip_prefix=["module."])
    assert renames(rules, ["module.fc.w", "fc.b"]) == {"module.fc.w": "fc.w"}
    rules = Rules(keep=["module.*"], strip_prefix=["module."])
    assert renames(rules, ["module.a", "a"]) == {"module.a": "a"}


def test_glob_star_matches_dots_and_the_whole_key() -> None:
    rules = Rules(keep=["enc*weight"])
    plan = rules.plan(["enc.layer.0.weight", "enc.layer.0.weight_g", "x.enc.weight"])
    assert [o for o, _ in plan.renames] == ["enc.layer.0.weight"]


def test_glob_is_case_sensitive() -> None:
    assert Rules(keep=["FC.*"]).plan(["fc.w"]).mapping == {}


def test_glob_question_mark_and_brackets() -> None:
    rules = Rules(keep=["layer?.[01].w"])
    assert [o for o, _ in rules.plan(["layer1.0.w", "layer2.1.w", "layer1.2.w"]).renames] == [
        "layer1.0.w",
        "layer2.1.w",
    ]


def test_no_rules_is_the_identity() -> None:
    plan = Rules().plan(MOCO_KEYS)
    assert plan.renames == tuple((k, k) for k in MOCO_KEYS)
    assert plan.dropped == ()
    assert plan.renamed == []
    assert plan.rule_counts == ()
    assert not Rules()


# -- counts and unused rules ------------------------------------------------------------------


def test_rule_counts_per_rule() -> None:
    rules = Rules(
        keep=["module.encoder_q.*", "queue"],
        drop=["module.encoder_q.fc.*"],
        strip_prefix=["module.encoder_q.", "module."],
        replace=[("conv", "Conv"), ("nothing", "x")],
        regex=[(r"\.weight$", ".w")],
        add_prefix="backbone.",
    )
    plan = rules.plan(MOCO_KEYS)
    assert dict(plan.rule_counts) == {
        "--keep 'module.encoder_q.*'": 4,
        "--keep queue": 1,
        "--drop 'module.encoder_q.fc.*'": 2,
        "--strip-prefix module.encoder_q.": 2,
        "--strip-prefix module.": 0,
        "--replace conv Conv": 1,
        "--replace nothing x": 0,
        "--regex '\\.weight$' .w": 1,
        "--add-prefix backbone.": 3,
    }
    assert [rule for rule, _ in plan.rule_counts] == rules.describe()
    assert plan.unused_rules == ["--strip-prefix module.", "--replace nothing x"]
    assert plan.mapping == {
        "module.encoder_q.conv1.weight": "backbone.Conv1.w",
        "module.encoder_q.layer1.0.bn1.running_mean": "backbone.layer1.0.bn1.running_mean",
        "queue": "backbone.queue",
    }


def test_each_key_counts_once_per_rule() -> None:
    # "a" occurs twice in the key: replace counts keys, not occurrences
    plan = Rules(replace=[("a", "b")], regex=[("b", "c")]).plan(["aa", "x"])
    assert dict(plan.rule_counts) == {"--replace a b": 1, "--regex b c": 1}


def test_a_rule_matching_nothing_is_unused() -> None:
    plan = Rules(keep=["nope.*"], drop=["x"]).plan(["a", "b"])
    assert plan.unused_rules == ["--keep 'nope.*'", "--drop x"]
    assert plan.renames == ()


def test_describe_quotes_for_the_shell() -> None:
    rules = Rules(replace=[(".bn", "")], add_prefix="a b.")
    assert rules.describe() == ["--replace .bn ''", "--add-prefix 'a b.'"]


def test_plan_to_dict() -> None:
    plan = Rules(drop=["b"], add_prefix="x.").plan(["a", "b"])
    assert plan.to_dict() == {
        "renames": [{"old": "a", "new": "x.a"}],
        "dropped": ["b"],
        "rule_counts": [{"rule": "--drop b", "keys": 1}, {"rule": "--add-prefix x.", "keys": 1}],
    }


# -- collisions -------------------------------------------------------------------------------


def test_two_keys_renamed_to_one_name() -> None:
    rules = Rules(strip_prefix=["module.encoder_q.", "module.encoder_k."])
    keys = ["module.encoder_q.conv1.weight", "module.encoder_k.conv1.weight"]
    with pytest.raises(KeyCollisionError) as info:
        rules.plan(keys)
    message = str(info.value)
    assert "'module.encoder_q.conv1.weight'" in message
    assert "'module.encoder_k.conv1.weight'" in message
    assert "'conv1.weight'" in message
    assert info.value.collisions == {"conv1.weight": tuple(keys)}
    assert isinstance(info.value, RuleError)
    assert isinstance(info.value, CheckpointError)


def test_a_renamed_key_landing_on_an_unchanged_key() -> None:
    rules = Rules(strip_prefix=["module."])
    with pytest.raises(KeyCollisionError, match=r"'fc\.w' and 'module\.fc\.w' -> 'fc\.w'"):
        rules.plan(["fc.w", "module.fc.w"])


def test_collision_is_raised_by_apply_too_and_nothing_is_overwritten() -> None:
    sd = {"a.x": 1, "b.x": 2}
    with pytest.raises(KeyCollisionError):
        Rules(regex=[(r"^\w\.", "")]).apply(sd)
    assert sd == {"a.x": 1, "b.x": 2}


def test_dropping_one_side_avoids_the_collision() -> None:
    rules = Rules(drop=["module.fc.w"], strip_prefix=["module."])
    assert rules.plan(["fc.w", "module.fc.w"]).mapping == {"fc.w": "fc.w"}


def test_many_collisions_are_summarised() -> None:
    keys = [f"{p}.k{i}" for i in range(7) for p in ("a", "b")]
    with pytest.raises(KeyCollisionError, match=r"and 2 more") as info:
        Rules(regex=[(r"^[ab]\.", "")]).plan(keys)
    assert len(info.value.collisions) == 7


def test_renaming_to_an_empty_name_is_refused() -> None:
    with pytest.raises(RuleError, match="empty name"):
        Rules(strip_prefix=["fc."], replace=[("w", "")]).plan(["fc.w"])


# -- the value --------------------------------------------------------------------------------


def test_rules_are_frozen() -> None:
    rules = Rules(keep=["a"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        rules.keep = ("b",)  # type: ignore[misc]


def test_rules_are_equal_by_value_and_hashable() -> None:
    a = Rules(keep=["a.*"], replace=[["x", "y"]], regex=[("p", "r")], add_prefix="z.")
    b = Rules(keep=("a.*",), replace=(("x", "y"),), regex=[["p", "r"]], add_prefix="z.")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != Rules(keep=["a.*"])
    assert a.keep == ("a.*",)
    assert a.replace == (("x", "y"),)
    assert a.regex == (("p", "r"),)


def test_rules_survive_dataclasses_replace() -> None:
    rules = dataclasses.replace(Rules(regex=[("a", "b")]), keep=("x*",))
    assert rules.plan(["xa", "y"]).mapping == {"xa": "xb"}


def test_a_bare_string_is_one_glob() -> None:
    rules = Rules(keep="fc.*", drop="fc.b*", strip_prefix="fc.")
    assert rules == Rules(keep=["fc.*"], drop=["fc.b*"], strip_prefix=["fc."])
    # a string taken as a list of characters would keep "f", "c", "." and everything ("*")
    assert rules.plan(["fc.w", "fc.bias", "conv.w", "f"]).mapping == {"fc.w": "w"}


def test_rules_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        Rules(["a"])  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"regex": [("(", "x")]}, r"regex '\(' is not a valid regular expression"),
        ({"regex": [("a", r"\1")]}, r"replacement '\\\\1' is invalid"),
        ({"regex": [("a", r"\g<name>")]}, r"replacement .* is invalid"),
        ({"strip_prefix": [""]}, r"strip_prefix: an empty prefix"),
        ({"strip_prefix": ["a", ""]}, r"strip_prefix: an empty prefix"),
        ({"replace": [("", "x")]}, r"replace: the text to replace must not be empty"),
        ({"replace": [("a",)]}, r"replace must be a list of \[old, new\] string pairs"),
        ({"replace": [("a", "b", "c")]}, r"replace must be a list of \[old, new\] string pairs"),
        ({"replace": ["ab"]}, r"replace must be a list of \[old, new\] string pairs"),
        ({"replace": ("a", "b")}, r"replace must be a list of \[old, new\] string pairs"),
        ({"replace": [("a", 1)]}, r"replace must be a list of \[old, new\] string pairs"),
        ({"replace": 5}, r"replace must be a list of \[old, new\] string pairs"),
        ({"replace": [5]}, r"replace must be a list of \[old, new\] string pairs"),
        ({"regex": [("a",)]}, r"regex must be a list of \[old, new\] string pairs"),
        ({"keep": [1]}, r"keep must be a list of strings"),
        ({"keep": 5}, r"keep must be a list of strings"),
        ({"drop": {"a": "b"}}, r"drop must be a list of strings"),
        ({"add_prefix": 3}, r"add_prefix must be a string"),
        ({"add_prefix": ["a"]}, r"add_prefix must be a string"),
    ],
)
def test_malformed_rules_raise_rule_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(RuleError, match=match):
        Rules(**kwargs)  # type: ignore[arg-type]


def test_or_concatenates_each_list() -> None:
    a = Rules(keep=["a*"], strip_prefix=["a."], replace=[("x", "y")], add_prefix="p.")
    b = Rules(keep=["b*"], drop=["b.z"], strip_prefix=["b."], regex=[("q", "r")])
    assert a | b == Rules(
        keep=["a*", "b*"],
        drop=["b.z"],
        strip_prefix=["a.", "b."],
        replace=[("x", "y")],
        regex=[("q", "r")],
        add_prefix="p.",
    )
    assert (b | a).strip_prefix == ("b.", "a.")
    assert (Rules() | b) == b
    assert (Rules(add_prefix="p.") | Rules(add_prefix="p.")).add_prefix == "p."


def test_or_refuses_two_different_add_prefixes() -> None:
    with pytest.raises(RuleError, match="add_prefix given twice"):
        Rules(add_prefix="a.") | Rules(add_prefix="b.")


def test_or_with_something_else_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Rules() | {"keep": ["a"]}


def test_apply_returns_a_new_dict_and_leaves_the_input_alone() -> None:
    values = [object(), object(), object()]
    sd = {"module.a": values[0], "module.b": values[1], "c": values[2]}
    before = dict(sd)
    out = Rules(drop=["c"], strip_prefix=["module."]).apply(sd)
    assert out == {"a": values[0], "b": values[1]}
    assert out["a"] is values[0]  # values are not copied
    assert sd == before
    assert list(sd) == list(before)
    identity = Rules().apply(sd)
    assert identity == sd
    assert identity is not sd


def test_apply_keeps_the_source_order() -> None:
    sd = {k: i for i, k in enumerate(["z", "a", "m"])}
    assert list(Rules(add_prefix="p.").apply(sd)) == ["p.z", "p.a", "p.m"]


def test_apply_on_real_tensors() -> None:
    import torch

    sd = {"module.w": torch.ones(2), "module.b": torch.zeros(1)}
    out = cs.Rules(strip_prefix=["module."]).apply(sd)
    assert set(out) == {"w", "b"}
    assert out["w"] is sd["module.w"]


# -- from_dict / from_toml / to_dict ----------------------------------------------------------


def test_from_dict_accepts_lists_strings_and_pairs() -> None:
    rules = Rules.from_dict(
        {
            "keep": "a*",
            "drop": ["a.x"],
            "strip_prefix": ["a."],
            "replace": [["b", "c"]],
            "regex": [["^c", "d"]],
            "add_prefix": "e.",
        }
    )
    assert rules == Rules(
        keep=["a*"],
        drop=["a.x"],
        strip_prefix=["a."],
        replace=[("b", "c")],
        regex=[("^c", "d")],
        add_prefix="e.",
    )


def test_from_dict_rejects_unknown_fields_naming_the_allowed_ones() -> None:
    with pytest.raises(RuleError) as info:
        Rules.from_dict({"keep": ["a"], "strip_prefixes": ["x"]}, where="mine")
    message = str(info.value)
    assert "mine" in message
    assert "'strip_prefixes'" in message
    for name in ("keep", "drop", "strip_prefix", "replace", "regex", "add_prefix"):
        assert name in message


def test_from_dict_names_where_a_bad_rule_is() -> None:
    with pytest.raises(RuleError, match=r"^recipe\.toml \[\[source\]\] 1: strip_prefix"):
        Rules.from_dict({"strip_prefix": [""]}, where="recipe.toml [[source]] 1")


def test_to_dict_round_trips() -> None:
    rules = Rules(
        keep=["a*"], drop=["a.x"], replace=[("b", "c")], regex=[("^c", "d")], add_prefix="e."
    )
    assert Rules.from_dict(rules.to_dict()) == rules
    assert rules.to_dict() == {
        "keep": ["a*"],
        "drop": ["a.x"],
        "replace": [["b", "c"]],
        "regex": [["^c", "d"]],
        "add_prefix": "e.",
    }
    assert Rules().to_dict() == {}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_from_toml_reads_rules_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path / "rules.toml",
        """
        key = "state_dict"
        keep = ["module.encoder_q.*"]
        drop = "module.encoder_q.fc.*"
        strip_prefix = ["module.", "encoder_q."]
        replace = [["bn", "norm"]]
        regex = [['^layer(\\d)', 'stage\\1']]
        add_prefix = "backbone."
        """,
    )
    rules, key = Rules.from_toml(path)
    assert key == "state_dict"
    assert rules == Rules(
        keep=["module.encoder_q.*"],
        drop=["module.encoder_q.fc.*"],
        strip_prefix=["module.", "encoder_q."],
        replace=[("bn", "norm")],
        regex=[(r"^layer(\d)", r"stage\1")],
        add_prefix="backbone.",
    )
    assert rules.plan(["module.encoder_q.layer1.bn.w"]).mapping == {
        "module.encoder_q.layer1.bn.w": "backbone.stage1.norm.w"
    }
    # a str path works as well as a Path
    assert Rules.from_toml(str(path)) == (rules, "state_dict")


def test_from_toml_without_key(tmp_path: Path) -> None:
    rules, key = Rules.from_toml(write(tmp_path / "r.toml", 'keep = "fc.*"\n'))
    assert key is None
    assert rules == Rules(keep=["fc.*"])


def test_from_toml_refuses_path(tmp_path: Path) -> None:
    path = write(tmp_path / "r.toml", 'path = "moco.pth.tar"\nkeep = ["a"]\n')
    with pytest.raises(RuleError, match=r"'path' belongs in a recipe"):
        Rules.from_toml(path)


def test_from_toml_reports_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path / "r.toml", "keep = [\n")
    with pytest.raises(RuleError, match=r"r\.toml' is not valid TOML"):
        Rules.from_toml(path)


def test_from_toml_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match=r"does not exist"):
        Rules.from_toml(tmp_path / "nope.toml")


def test_from_toml_reports_a_folder(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match=r"cannot be read"):
        Rules.from_toml(tmp_path)


def test_from_toml_unknown_field_lists_key_too(tmp_path: Path) -> None:
    path = write(tmp_path / "r.toml", 'kep = ["a"]\n')
    with pytest.raises(RuleError, match=r"unknown field 'kep'; allowed: key, keep, drop"):
        Rules.from_toml(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("key = 5\n", r"'key' must be a string"),
        ("keep = 5\n", r"keep must be a list of strings"),
        ("replace = 5\n", r"replace must be a list"),
        ('replace = ["a", "b"]\n', r"replace must be a list"),
        ('regex = [["(", "x"]]\n', r"not a valid regular expression"),
        ("add_prefix = 1\n", r"add_prefix must be a string"),
    ],
)
def test_from_toml_bad_values(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(RuleError, match=match) as info:
        Rules.from_toml(write(tmp_path / "r.toml", text))
    assert "r.toml" in str(info.value)


# -- properties -------------------------------------------------------------------------------

part = st.text(alphabet=string.ascii_lowercase + string.digits + "_", min_size=1, max_size=6)
dotted = st.lists(part, min_size=1, max_size=4).map(".".join)
key_lists = st.lists(dotted, min_size=0, max_size=25, unique=True)
globs = st.lists(st.text(alphabet="ab.*?_", min_size=1, max_size=5), min_size=0, max_size=3)


@given(keys=key_lists, add=st.sampled_from(["", "new.", "x_"]))
def test_strip_then_add_a_unique_prefix_is_an_ordered_bijection(keys: list[str], add: str) -> None:
    prefixed = ["__old__." + k for k in keys]
    plan = Rules(strip_prefix=["__old__."], add_prefix=add).plan(prefixed)
    assert [old for old, _ in plan.renames] == prefixed
    assert [new for _, new in plan.renames] == [add + k for k in keys]
    assert len(set(plan.mapping.values())) == len(keys)
    assert plan.dropped == ()


@given(keys=key_lists)
def test_drop_all_keeps_nothing(keys: list[str]) -> None:
    plan = Rules(drop=["*"]).plan(keys)
    assert plan.renames == ()
    assert plan.dropped == tuple(keys)
    assert Rules(keep=["*"], drop=["*"]).apply(dict.fromkeys(keys, 0)) == {}


@given(keys=key_lists, keep=globs, drop=globs)
def test_kept_and_dropped_partition_the_input(
    keys: list[str], keep: list[str], drop: list[str]
) -> None:
    plan = Rules(keep=keep, drop=drop).plan(keys)
    kept = [old for old, _ in plan.renames]
    assert sorted(kept + list(plan.dropped)) == sorted(keys)
    assert not set(kept) & set(plan.dropped)
    # both lists stay in source order
    assert kept == [k for k in keys if k in set(kept)]
    assert list(plan.dropped) == [k for k in keys if k in set(plan.dropped)]
    # without renaming rules every kept key keeps its name
    assert all(old == new for old, new in plan.renames)


@pytest.mark.filterwarnings("ignore::ckptsurgery.rules.UnusedPatternWarning")
@given(keys=key_lists, keep=globs, drop=globs)
def test_apply_equals_plan_mapping(keys: list[str], keep: list[str], drop: list[str]) -> None:
    rules = Rules(keep=keep, drop=drop, add_prefix="p.")
    sd = {k: i for i, k in enumerate(keys)}
    out = rules.apply(sd)
    assert out == {new: sd[old] for old, new in rules.plan(keys).renames}
    assert sd == {k: i for i, k in enumerate(keys)}
