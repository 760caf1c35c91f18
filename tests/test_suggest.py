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


def test_first_conv_for_other_input_channels_is_adapted(resnet50: Shapes) -> None:
    model = dict(resnet50, **{"conv1.weight": (64, 1, 7, 7)})
    s = suggest({"module." + k: v for k, v in resnet50.items()}, model)
    [adapter] = s.adapters
    assert adapter.op == "in_chans" and adapter.args == ("--in-chans", "conv1.weight", "1")
    assert s.missing_after == () and s.unexpected_after == ()


def test_position_embedding_for_another_grid_is_resampled() -> None:
    vit = {
        "cls_token": (1, 1, 192),
        "pos_embed": (1, 197, 192),
        "patch_embed.proj.weight": (192, 3, 16, 16),
        "blocks.0.attn.qkv.weight": (576, 192),
    }
    model = dict(vit, pos_embed=(1, 577, 192))
    s = suggest({"model." + k: v for k, v in vit.items()}, model)
    [adapter] = s.adapters
    assert adapter.args == ("--resample-pos-embed", "pos_embed", "24x24", "--prefix-tokens", "1")
    assert adapter.to_dict()["params"] == {"size": [24, 24], "prefix_tokens": 1}
    assert "--resample-pos-embed pos_embed 24x24 --prefix-tokens 1" in s.remap_command()
    # no class token (a 14x14 grid to 16x16)
    s = suggest(
        {"pos_embed": (1, 196, 8), "a.weight": (2, 2)},
        {"pos_embed": (1, 256, 8), "a.weight": (2, 2)},
    )
    assert [a.args for a in s.adapters] == [
        ("--resample-pos-embed", "pos_embed", "16x16", "--prefix-tokens", "0")
    ]


def test_sibling_prefixes_with_continuing_indices_become_one_regex() -> None:
    model = {f"features.{i}.weight": (i + 1, 3) for i in range(12)}
    ckpt = {f"net.slice{i // 4 + 1}.{i}.weight": (i + 1, 3) for i in range(12)}
    s = suggest(ckpt, model)
    assert s.rules == Rules(regex=[(r"^net\.slice\d+\.", "features.")])
    assert s.matched_after == 12
    assert s.rule_counts == ((r"--regex '^net\.slice\d+\.' features.", 12),)


def test_sibling_prefixes_whose_indices_restart_are_not_merged() -> None:
    """Each slice counting from 0 would collide under one regex: no such rule is proposed."""
    model = {f"features.{i}.weight": (3, 3) for i in range(4)}
    ckpt = {f"net.slice{s}.{i}.weight": (3, 3) for s in (1, 2) for i in range(2)}
    s = suggest(ckpt, model)
    assert s.rules is None or not s.rules.regex


def test_inner_rename_of_a_head() -> None:
    body = {"conv1.weight": (8, 3, 3, 3), "bn1.weight": (8,), "bn1.bias": (8,)}
    ckpt = {"module." + k: v for k, v in body.items()}
    ckpt.update({"module.linear.weight": (10, 8), "module.linear.bias": (10,)})
    model = dict(body, **{"fc.weight": (10, 8), "fc.bias": (10,)})
    s = suggest(ckpt, model)
    assert s.rules == Rules(strip_prefix=["module."], regex=[(r"^linear\.", "fc.")])
    assert s.matched_after == len(model)


def test_head_only_checkpoint_is_renamed_not_dropped() -> None:
    s = suggest(
        {"module.linear.weight": (10, 8), "module.linear.bias": (10,)},
        {"fc.weight": (10, 8), "fc.bias": (10,)},
    )
    assert s.rules == Rules(regex=[(r"^module\.linear\.", "fc.")])
    assert s.rules.apply({"module.linear.weight": 1, "module.linear.bias": 2}) == {
        "fc.weight": 1,
        "fc.bias": 2,
    }


def test_never_drops_every_key() -> None:
    s = suggest({"module.a.weight": (3, 7), "module.b.weight": (2,)}, {"fc.weight": (10, 8)})
    assert s.rules is None and s.remap_command() == ""
    assert any("drop every key" in n for n in s.notes)


def test_suggest_after_the_rules_given(resnet50: Shapes) -> None:
    from ckptsurgery.suggest import suggest_after

    ckpt = _moco(resnet50)
    s = suggest_after(Rules(strip_prefix=["module."]), ckpt, resnet50)
    assert s.rules is not None
    assert _apply(s.rules, ckpt) == {k: v for k, v in resnet50.items() if not k.startswith("fc.")}
    assert s.rules.strip_prefix[0] == "module."


def test_recommendation_among_candidates() -> None:
    from ckptsurgery.candidates import CandidateFit, preferred, recommend

    def fit(key: str, n: int) -> CandidateFit:
        return CandidateFit(key, 10, 40, 0, n, 10, False)

    assert recommend([fit("student", 10), fit("teacher", 10)])[0] == "teacher"
    assert recommend([fit("model", 10), fit("model_ema", 10)])[0] == "model_ema"
    assert recommend([fit("model", 10), fit("model_ema", 7)])[0] == "model"
    chosen, reason = recommend([fit("a", 10), fit("b", 10)])
    assert chosen is None and "--key" in reason
    assert preferred(["state_dict", "state_dict_ema"]) == "state_dict_ema"
    assert preferred(["schema", "model"]) is None


def test_modules_renamed_beside_a_prefix_added() -> None:
    """The MNIST CNN of the digits demo: ``conv_layers.*`` go under ``backbone.features.``,
    ``fc_layers.0`` is ``backbone.embed.0`` and ``fc_layers.2`` the ``head``: an add_prefix
    cannot say that, anchored regexes can."""
    ckpt = {
        "conv_layers.0.weight": (32, 1, 3, 3),
        "conv_layers.0.bias": (32,),
        "conv_layers.3.weight": (64, 32, 3, 3),
        "conv_layers.3.bias": (64,),
        "fc_layers.0.weight": (256, 1152),
        "fc_layers.0.bias": (256,),
        "fc_layers.2.weight": (10, 256),
        "fc_layers.2.bias": (10,),
    }
    model = {
        "backbone.features.0.weight": (32, 1, 3, 3),
        "backbone.features.0.bias": (32,),
        "backbone.features.3.weight": (64, 32, 3, 3),
        "backbone.features.3.bias": (64,),
        "backbone.embed.0.weight": (256, 1152),
        "backbone.embed.0.bias": (256,),
        "head.weight": (10, 256),
        "head.bias": (10,),
    }
    s = suggest(ckpt, model)
    assert s.rules == Rules(
        regex=[
            (r"^conv_layers\.", "backbone.features."),
            (r"^fc_layers\.0\.", "backbone.embed.0."),
            (r"^fc_layers\.2\.", "head."),
        ]
    )
    assert _apply(s.rules, ckpt) == model
