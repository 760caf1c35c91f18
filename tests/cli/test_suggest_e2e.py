"""``diff --suggest`` end to end: the suggested command, run as printed, gives what it promised.

For each realistic layout (DataParallel, MoCo, BERT without its ``bert.`` prefix, a
``torch.compile`` ``_orig_mod.`` segment) the suggestion is taken from ``diff --suggest``
(JSON or human), its ``remap`` command is run through the CLI, and ``diff`` of the result must
show exactly the missing keys the suggestion announced, nothing unexpected and no shape
mismatch; the tensors written are the source's, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from conftest import cli_run_clean, import_source, raw
from safetensors.torch import load_file

from ckptsurgery.rules import Rules
from ckptsurgery.suggest import rule_args

torchvision = pytest.importorskip("torchvision")

R18 = ("--model", "torchvision:resnet18")
OUT_PLACEHOLDER = "OUT.safetensors"

# -- helpers ----------------------------------------------------------------------------------


def diff_json(*args: str | Path) -> tuple[int, dict[str, Any]]:
    result = cli_run_clean("diff", *args, "--json")
    assert result.exit_code in (0, 1), result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return result.exit_code, data


def suggestion_of(src: str | Path, *args: str) -> dict[str, Any]:
    code, data = diff_json(src, *args, "--suggest")
    assert code == 1  # a checkpoint that needs rules does not fit as it is
    suggestion: dict[str, Any] = data["suggestion"]
    return suggestion


def run_command(command: str, out: Path) -> Result:
    """Run a printed ``ckptsurgery remap ...`` line with OUT replaced by ``out``."""
    words = shlex.split(command)
    assert words[:2] == ["ckptsurgery", "remap"]
    i = words.index("-o")
    assert words[i + 1] == OUT_PLACEHOLDER
    words[i + 1] = str(out)
    return cli_run_clean(*words[1:])


def check_result(out: Path, suggestion: Mapping[str, Any], *model: str) -> dict[str, Any]:
    """``diff OUT`` shows exactly what the suggestion promised."""
    code, data = diff_json(out, *model)
    assert data["missing"] == suggestion["missing_after"]
    assert data["unexpected"] == [] and data["shape_mismatch"] == []
    assert len(data["matched"]) == suggestion["matched_after"]
    assert code == (1 if suggestion["missing_after"] else 0)
    if suggestion["missing_after"]:
        allow = [w for g in suggestion["allow_missing"] for w in ("--allow-missing", g)]
        code, allowed = diff_json(out, *model, *allow)
        assert code == 0 and allowed["allowed_missing"] == suggestion["missing_after"]
    return data


def check_bits(out: Path, source: Mapping[str, torch.Tensor], rules: Rules) -> None:
    written = load_file(str(out))
    plan = rules.plan(source)
    assert set(written) == {new for _, new in plan.renames}
    for old, new in plan.renames:
        assert written[new].dtype == source[old].dtype, new
        assert raw(written[new]) == raw(source[old]), new


def apply_suggestion(
    tmp_path: Path, src: Path, source: Mapping[str, torch.Tensor], *model: str
) -> dict[str, Any]:
    """The whole loop: suggest, run the command, diff the result. Returns the suggestion."""
    s = suggestion_of(src, *model)
    assert s["command"] and s["ambiguities"] == []
    out = tmp_path / "fixed.safetensors"
    result = run_command(s["command"], out)
    assert result.exit_code == 0, result.output
    assert out.exists()
    check_result(out, s, *model)
    check_bits(out, source, Rules.from_dict(s["rules"]))
    return s


@pytest.fixture(scope="module")
def r18() -> dict[str, torch.Tensor]:
    """A real (randomly initialised) resnet18 state dict, 45 MB."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


# -- (a) DataParallel -------------------------------------------------------------------------


def test_dataparallel_prefix(tmp_path: Path, r18: dict[str, torch.Tensor]) -> None:
    source = {"module." + k: v for k, v in r18.items()}
    torch.save(source, src := tmp_path / "dp.pth")
    s = apply_suggestion(tmp_path, src, source, *R18)
    assert s["rules"] == {"strip_prefix": ["module."]}
    assert s["missing_after"] == [] and s["matched_before"] == 0
    assert s["matched_after"] == s["model_keys"] == len(r18)


def test_dataparallel_into_a_model_with_another_head(
    tmp_path: Path, r18: dict[str, torch.Tensor]
) -> None:
    source = {"module." + k: v for k, v in r18.items()}
    torch.save(source, src := tmp_path / "dp.pth")
    model = (*R18, "--model-arg", "num_classes=10")
    s = suggestion_of(src, *model)
    # The 1000-class head is cut to 10 rows (which ones, the user says), not dropped.
    assert s["rules"] == {"strip_prefix": ["module."]}
    [rows] = s["adapters"]
    assert rows["op"] == "rows" and rows["args"] == ["--rows", "fc.*", "0-9"]
    assert rows["matches"] == 2 and rows["keys"] == ["fc.weight", "fc.bias"]
    assert "choose" in rows["note"] or "give the indices" in rows["note"]
    assert s["missing_after"] == [] and s["allow_missing"] == []
    assert s["command"].endswith(
        "--strip-prefix module. --rows 'fc.*' 0-9 --model torchvision:resnet18 "
        "--model-arg num_classes=10"
    )
    assert {"rule": "--rows 'fc.*' 0-9", "matches": 2, "kind": "adapter"} in s["proposals"]
    if "--rows" not in cli_run_clean("remap", "--help").stdout:
        return  # the adapter options are not part of this build: the command is not runnable
    out = tmp_path / "fixed.safetensors"
    result = run_command(s["command"], out)
    assert result.exit_code == 0, result.output
    assert diff_json(out, *model)[0] == 0


# -- (b) MoCo ---------------------------------------------------------------------------------


def moco(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A MoCo v2 checkpoint of resnet18: two encoders with a 2-layer MLP head, the queue."""
    g = torch.Generator().manual_seed(1)
    sd: dict[str, torch.Tensor] = {}
    for enc in ("module.encoder_q.", "module.encoder_k."):
        sd.update({enc + k: v.clone() for k, v in state.items() if not k.startswith("fc.")})
        sd[enc + "fc.0.weight"] = torch.randn(512, 512, generator=g)
        sd[enc + "fc.0.bias"] = torch.randn(512, generator=g)
        sd[enc + "fc.2.weight"] = torch.randn(128, 512, generator=g)
        sd[enc + "fc.2.bias"] = torch.randn(128, generator=g)
    sd["module.queue"] = torch.randn(128, 4096, generator=g)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {"lr": 0.03}}


MOCO_RULES = Rules(
    keep=["module.encoder_q.*"],
    drop=["module.encoder_q.fc.*"],
    strip_prefix=["module.encoder_q."],
)


@pytest.mark.parametrize("model_args", [(), ("--model-arg", "num_classes=10")])
def test_moco(tmp_path: Path, r18: dict[str, torch.Tensor], model_args: tuple[str, ...]) -> None:
    ckpt = moco(r18)
    torch.save(ckpt, src := tmp_path / "moco_v2.pth.tar")
    s = apply_suggestion(tmp_path, src, ckpt["state_dict"], *R18, *model_args)
    assert Rules.from_dict(s["rules"]) == MOCO_RULES
    assert s["missing_after"] == ["fc.weight", "fc.bias"]
    assert s["unexpected_after"] == []
    assert any("encoder_k" in n for n in s["notes"])


def test_moco_human_output_is_ready_to_run(tmp_path: Path, r18: dict[str, torch.Tensor]) -> None:
    ckpt = moco(r18)
    torch.save(ckpt, src := tmp_path / "moco_v2.pth.tar")
    result = cli_run_clean("diff", src, *R18, "--suggest")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()

    commands = [line.strip() for line in lines if line.startswith("  ckptsurgery remap ")]
    assert len(commands) == 1
    assert commands[0] == (
        f"ckptsurgery remap {src} -o OUT.safetensors --keep 'module.encoder_q.*' "
        "--drop 'module.encoder_q.fc.*' --strip-prefix module.encoder_q. "
        "--model torchvision:resnet18 --allow-missing 'fc.*'"
    )
    start = lines.index("as a rules file (remap --rules FILE.toml):") + 2
    end = lines.index("", start)
    block = "\n".join(line.strip() for line in lines[start:end])
    assert Rules.from_dict(tomllib.loads(block)) == MOCO_RULES
    assert "still missing with these rules: fc.{bias, weight}" in result.stdout
    assert "120 of 122 model tensors would match (now 0)" in result.stdout

    # The printed line runs as it is; so does the TOML block as a rules file.
    out = tmp_path / "backbone.safetensors"
    assert run_command(commands[0], out).exit_code == 0
    check_bits(out, ckpt["state_dict"], MOCO_RULES)
    (tmp_path / "rules.toml").write_text(block, encoding="utf-8")
    out2 = tmp_path / "backbone2.safetensors"
    result = cli_run_clean("remap", src, "-o", out2, "--rules", tmp_path / "rules.toml")
    assert result.exit_code == 0, result.output
    assert out2.read_bytes() != b"" and set(load_file(str(out2))) == set(load_file(str(out)))


# -- (c) BERT without its prefix --------------------------------------------------------------

BERT = '''
import torch
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)


class Output(nn.Module):
    def __init__(self, h_in: int, h: int) -> None:
        super().__init__()
        self.dense = nn.Linear(h_in, h)
        self.LayerNorm = nn.LayerNorm(h)


class Attention(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.self = SelfAttention(h)
        self.output = Output(h, h)


class Intermediate(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.dense = nn.Linear(h, 4 * h)


class Layer(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.attention = Attention(h)
        self.intermediate = Intermediate(h)
        self.output = Output(4 * h, h)


class Encoder(nn.Module):
    def __init__(self, h: int, layers: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(h) for _ in range(layers))


class Embeddings(nn.Module):
    def __init__(self, vocab: int, h: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, h)
        self.position_embeddings = nn.Embedding(32, h)
        self.token_type_embeddings = nn.Embedding(2, h)
        self.LayerNorm = nn.LayerNorm(h)
        self.register_buffer("position_ids", torch.arange(32)[None], persistent=False)


class Pooler(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.dense = nn.Linear(h, h)


class TinyBert(nn.Module):
    """The layout of Hugging Face's BertModel (12 layers, as BERT-base), 8 wide."""

    def __init__(self, vocab: int = 64, hidden: int = 8, layers: int = 12) -> None:
        super().__init__()
        self.embeddings = Embeddings(vocab, hidden)
        self.encoder = Encoder(hidden, layers)
        self.pooler = Pooler(hidden)


class TinyBertClassifier(nn.Module):
    """BertForSequenceClassification's layout: the encoder under ``bert.``, then a head."""

    def __init__(self, num_labels: int = 3, **kwargs: int) -> None:
        super().__init__()
        self.bert = TinyBert(**kwargs)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(self.bert.pooler.dense.out_features, num_labels)
'''


@pytest.fixture
def bert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The module ``cs_e2e_bert`` in the current folder, where model specs look first."""
    monkeypatch.chdir(tmp_path)
    yield from import_source(tmp_path, "cs_e2e_bert", BERT, monkeypatch)


def test_bert_prefix_is_added(tmp_path: Path, bert: Any) -> None:
    torch.manual_seed(0)
    source = bert.TinyBert().state_dict()
    torch.save(source, "pytorch_model.bin")
    s = apply_suggestion(
        tmp_path, Path("pytorch_model.bin"), source, "--model", "cs_e2e_bert:TinyBertClassifier"
    )
    assert s["rules"] == {"add_prefix": "bert."}
    assert s["missing_after"] == ["classifier.weight", "classifier.bias"]
    assert s["allow_missing"] == ["classifier.*"]
    assert s["matched_after"] == len(source) == s["model_keys"] - 2


# -- (d) torch.compile's _orig_mod. in the middle of keys -------------------------------------


@pytest.mark.parametrize(
    ("prefix", "rules"),
    [
        ("", {"replace": [["_orig_mod.", ""]]}),
        # Compiled stages inside a DistributedDataParallel wrapper: strip, then replace.
        ("module.", {"strip_prefix": ["module."], "replace": [["_orig_mod.", ""]]}),
    ],
)
def test_orig_mod_segment_in_the_middle(
    tmp_path: Path, r18: dict[str, torch.Tensor], prefix: str, rules: dict[str, Any]
) -> None:
    # Each residual stage was compiled on its own: layer1._orig_mod.0.conv1.weight ...
    source = {prefix + re.sub(r"^(layer\d)\.", r"\1._orig_mod.", k): v for k, v in r18.items()}
    torch.save(source, src := tmp_path / "compiled.pt")
    s = apply_suggestion(tmp_path, src, source, *R18)
    assert s["rules"] == rules
    assert s["missing_after"] == []
    assert s["matched_before"] == (0 if prefix else len([k for k in r18 if "layer" not in k]))


# -- what the command carries ----------------------------------------------------------------


def test_command_carries_key_and_trusted_globals(
    tmp_path: Path, r18: dict[str, torch.Tensor]
) -> None:
    ema = {"module." + k: v + 1 if v.is_floating_point() else v for k, v in r18.items()}
    ckpt = {
        "args": argparse.Namespace(lr=0.1),  # needs --allow-global to be read
        "state_dict": {"module." + k: v for k, v in r18.items()},
        "state_dict_ema": ema,
    }
    torch.save(ckpt, src := tmp_path / "ema.pth")
    trust = ("--allow-global", "argparse.Namespace")
    s = suggestion_of(src, *R18, "--key", "state_dict_ema", *trust)
    assert "--key state_dict_ema" in s["command"]
    assert "--allow-global argparse.Namespace" in s["command"]
    out = tmp_path / "ema.safetensors"
    result = run_command(s["command"], out)
    assert result.exit_code == 0, result.output
    check_result(out, s, *R18)
    check_bits(out, ema, Rules(strip_prefix=["module."]))


# -- ambiguity --------------------------------------------------------------------------------


def test_student_and_teacher_are_listed_not_chosen(
    tmp_path: Path, r18: dict[str, torch.Tensor]
) -> None:
    flat = {f"{who}.{k}": v for who in ("student", "teacher") for k, v in r18.items()}
    torch.save(flat, src := tmp_path / "distill.pth")
    s = suggestion_of(src, *R18)
    assert s["rules"] is None and s["command"] is None and s["toml"] is None
    assert s["matched_after"] == s["matched_before"] == 0
    assert len(s["ambiguities"]) == 1
    student = Rules(keep=["student.*"], strip_prefix=["student."])
    teacher = Rules(keep=["teacher.*"], strip_prefix=["teacher."])
    assert [Rules.from_dict(r) for r in s["alternatives"]] == [student, teacher]
    for rules in (student, teacher):
        assert " ".join(rules.describe()) in s["ambiguities"][0]

    result = cli_run_clean("diff", src, *R18, "--suggest")
    assert result.exit_code == 1
    assert "ckptsurgery remap" not in result.stdout
    assert (
        "ambiguous: several rule sets each match 122 of 122 model keys; pick one for remap: "
        in (result.stdout)
    )

    # Either alternative, once picked, gives a checkpoint that fits.
    for i, rules in enumerate((student, teacher)):
        out = tmp_path / f"picked{i}.safetensors"
        result = cli_run_clean("remap", src, "-o", out, *rule_args(rules), *R18)
        assert result.exit_code == 0, result.output
        check_bits(out, flat, rules)
        assert diff_json(out, *R18)[0] == 0


# -- against a reference checkpoint; tied names ----------------------------------------------


def test_against_a_reference_checkpoint(tmp_path: Path, r18: dict[str, torch.Tensor]) -> None:
    source = {"module." + k: v for k, v in r18.items()}
    torch.save(source, src := tmp_path / "dp.pth")
    torch.save(r18, ref := tmp_path / "ref.pth")
    s = suggestion_of(src, "--against", str(ref))
    assert "--model" not in s["command"]  # no model to gate with
    out = tmp_path / "out.safetensors"
    assert run_command(s["command"], out).exit_code == 0
    assert diff_json(out, "--against", ref)[0] == 0
    check_bits(out, source, Rules(strip_prefix=["module."]))


def test_a_tied_alias_is_not_promised_missing() -> None:
    from torch import nn

    from ckptsurgery.loading import tie_groups
    from ckptsurgery.match import match
    from ckptsurgery.suggest import suggest

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.proj = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 50, bias=False)
            self.lm_head.weight = self.embed.weight

    with torch.device("meta"):
        model = TiedLM()
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # Saved as safetensors does: the tied tensor once, under one name.
    ckpt = {"module." + k: s for k, s in model_shapes.items() if k != "lm_head.weight"}

    s = suggest(ckpt, model_shapes, ties=tie_groups(model))
    assert s.rules == Rules(strip_prefix=["module."])
    assert s.missing_after == () and s.allow_missing == ()
    renamed = {k: torch.empty(v, device="meta") for k, v in s.rules.apply(ckpt).items()}
    assert match(renamed, model).compatible
    # Without the ties, the alias looks missing.
    assert suggest(ckpt, model_shapes).missing_after == ("lm_head.weight",)
