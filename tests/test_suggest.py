"""Suggested rules: found from key names and shapes, never applied by themselves."""

from __future__ import annotations

import pytest

from ckptsurgery.rules import Rules
from ckptsurgery.suggest import rule_args, rules_toml, suggest

Shapes = dict[str, tuple[int, ...]]


@pytest.fixture(scope="module")
def resnet50() -> Shapes:
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _moco(model: Shapes) -> Shapes:
    ckpt: Shapes = {}
    for enc in ("module.encoder_q.", "module.encoder_k."):
        ckpt.update({enc + k: s for k, s in model.items() if not k.startswith("fc.")})
        ckpt[enc + "fc.0.weight"] = (2048, 2048)
        ckpt[enc + "fc.0.bias"] = (2048,)
        ckpt[enc + "fc.2.weight"] = (128, 2048)
        ckpt[enc + "fc.2.bias"] = (128,)
    ckpt["module.queue"] = (128, 65536)
    ckpt["module.queue_ptr"] = (1,)
    return ckpt


def _apply(rules: Rules, ckpt: Shapes) -> Shapes:
    return rules.apply(ckpt)


def test_dataparallel_prefix(resnet50: Shapes) -> None:
    ckpt = {"module." + k: s for k, s in resnet50.items()}
    s = suggest(ckpt, resnet50)
    assert s.rules == Rules(strip_prefix=["module."])
    assert s.matched_before == 0
    assert s.matched_after == len(resnet50) == s.model_keys
    assert s.missing_after == () and s.unexpected_after == ()
    assert _apply(s.rules, ckpt) == resnet50


def test_moco_strips_query_encoder_and_drops_the_rest(resnet50: Shapes) -> None:
    ckpt = _moco(resnet50)
    s = suggest(ckpt, resnet50)
    assert s.rules == Rules(
        keep=["module.encoder_q.*"],
        drop=["module.encoder_q.fc.*"],
        strip_prefix=["module.encoder_q."],
    )
    assert s.missing_after == ("fc.weight", "fc.bias")
    assert s.unexpected_after == ()
    assert s.ambiguities == ()
    assert any("encoder_k" in n for n in s.notes)
    result = _apply(s.rules, ckpt)
    assert set(resnet50) - set(result) == {"fc.weight", "fc.bias"}
    assert all(resnet50[k] == v for k, v in result.items())


def test_moco_command_and_toml_are_ready_to_use(resnet50: Shapes) -> None:
    s = suggest(_moco(resnet50), resnet50)
    assert s.remap_command("moco.pth.tar", "r50.safetensors") == (
        "ckptsurgery remap moco.pth.tar -o r50.safetensors --keep 'module.encoder_q.*' "
        "--drop 'module.encoder_q.fc.*' --strip-prefix module.encoder_q."
    )
    import tomllib

    assert s.rules is not None
    assert Rules.from_dict(tomllib.loads(s.toml())) == s.rules


def test_a_bigger_head_is_cut_to_rows_not_dropped(resnet50: Shapes) -> None:
    model = dict(resnet50, **{"fc.weight": (10, 2048), "fc.bias": (10,)})
    ckpt = {"module." + k: s for k, s in resnet50.items()}
    s = suggest(ckpt, model)
    assert s.rules == Rules(strip_prefix=["module."])
    [rows] = s.adapters
    assert rows.op == "rows" and rows.args == ("--rows", "fc.*", "0-9")
    assert rows.keys == ("fc.weight", "fc.bias")
    assert "placeholder" in rows.note  # the user chooses which rows
    assert s.missing_after == () and s.unexpected_after == () and s.allow_missing == ()
    assert "--rows 'fc.*' 0-9" in s.remap_command()
    proposals = s.to_dict()["proposals"]
    assert {"rule": "--strip-prefix module.", "matches": len(ckpt), "kind": "rule"} in proposals
    assert {"rule": "--rows 'fc.*' 0-9", "matches": 2, "kind": "adapter"} in proposals


def test_a_smaller_head_is_dropped(resnet50: Shapes) -> None:
    ckpt = {"module." + k: s for k, s in resnet50.items()}
    ckpt.update({"module.fc.weight": (10, 2048), "module.fc.bias": (10,)})
    s = suggest(ckpt, resnet50)
    assert s.rules == Rules(drop=["module.fc.*"], strip_prefix=["module."])
    assert s.adapters == ()
    assert s.missing_after == ("fc.weight", "fc.bias")
    assert s.allow_missing == ("fc.*",)


def test_bert_prefix_is_added_and_pretraining_heads_dropped() -> None:
    enc = {
        "embeddings.word_embeddings.weight": (30522, 64),
        "embeddings.position_embeddings.weight": (512, 64),
        "encoder.layer.0.attention.self.query.weight": (64, 64),
        "encoder.layer.0.attention.self.query.bias": (64,),
        "encoder.layer.0.output.dense.weight": (64, 256),
        "pooler.dense.weight": (64, 64),
    }
    ckpt = dict(enc, **{"cls.predictions.bias": (30522,), "cls.seq_relationship.weight": (2, 64)})
    model = {"bert." + k: s for k, s in enc.items()}
    model.update({"classifier.weight": (3, 64), "classifier.bias": (3,)})
    s = suggest(ckpt, model)
    assert s.rules == Rules(drop=["cls.*"], add_prefix="bert.")
    assert s.missing_after == ("classifier.weight", "classifier.bias")
    assert s.unexpected_after == ()


def test_orig_mod_segment_in_the_middle(resnet50: Shapes) -> None:
    ckpt = {k.replace("layer1.", "layer1._orig_mod."): s for k, s in resnet50.items()}
    s = suggest(ckpt, resnet50)
    assert s.rules == Rules(replace=[("_orig_mod.", "")])
    assert _apply(s.rules, ckpt) == resnet50


def test_tied_rule_sets_are_listed_not_chosen(resnet50: Shapes) -> None:
    ckpt = {"student.backbone." + k: s for k, s in resnet50.items()}
    ckpt.update({"teacher.backbone." + k: s for k, s in resnet50.items()})
    s = suggest(ckpt, resnet50)
    assert s.rules is None
    assert s.remap_command() == ""
    assert len(s.ambiguities) == 1
    assert "student.backbone." in s.ambiguities[0] and "teacher.backbone." in s.ambiguities[0]


def test_a_key_that_could_go_to_two_places_is_reported() -> None:
    ckpt = {"blocks.0.weight": (4, 4), "extra.proj.weight": (4, 4)}
    model = {"blocks.0.weight": (4, 4), "a.proj.weight": (4, 4), "b.proj.weight": (4, 4)}
    s = suggest(ckpt, model)
    assert any("extra.proj.weight" in a and "a.proj.weight" in a for a in s.ambiguities)


def test_nothing_to_suggest_when_keys_already_match(resnet50: Shapes) -> None:
    s = suggest(resnet50, resnet50)
    assert s.rules is None
    assert s.matched_before == s.matched_after == len(resnet50)


def test_rule_args_and_toml_round_trip_every_rule_kind() -> None:
    rules = Rules(
        keep=["a.*"],
        drop=["a.x.*"],
        strip_prefix=["a."],
        replace=[("old", "new")],
        regex=[(r"(\d+)", r"n\1")],
        add_prefix="m.",
    )
    assert rule_args(rules) == [
        "--keep", "a.*", "--drop", "a.x.*", "--strip-prefix", "a.",
        "--replace", "old", "new", "--regex", r"(\d+)", r"n\1", "--add-prefix", "m.",
    ]  # fmt: skip
    import tomllib

    assert Rules.from_dict(tomllib.loads(rules_toml(rules))) == rules
