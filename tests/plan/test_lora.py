"""Folding peft LoRA adapters into their base (`cs.fold_lora`), checked against peft's own
`merge_and_unload()` on tiny real models: every tensor within 1e-5, no key more or less."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_close_state, peft_lora, tiny_bert
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import ckptsurgery as cs

peft = pytest.importorskip("peft", reason="peft is not installed (pip install '.[lora]')")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

BERT_TARGETS = ["query", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def bert_case(tmp_path: Path, **config: Any) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    model = tiny_bert()
    model.save_pretrained(tmp_path / "base")
    merged = peft_lora(model, tmp_path / "adapter", **config)
    return tmp_path / "base" / "model.safetensors", tmp_path / "adapter", merged


def test_bert_attention_and_mlp_with_patterns_and_modules_to_save(tmp_path: Path) -> None:
    base, adapter, merged = bert_case(
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=BERT_TARGETS,
        rank_pattern={"layer.1.attention.self.query": 2},
        alpha_pattern={"value": 3},
        modules_to_save=["classifier"],
    )
    result = cs.fold_lora(base, adapter, tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    assert_close_state(out, merged)
    ops = {e.name: e.op for e in result.plan.entries}
    assert ops["bert.encoder.layer.0.attention.self.query.weight"].describe() == (
        "lora-fold r=4 scale=2.0"
    )
    assert ops["bert.encoder.layer.1.attention.self.query.weight"].describe() == (
        "lora-fold r=2 scale=4.0"
    )
    assert ops["bert.encoder.layer.0.attention.self.value.weight"].describe() == (
        "lora-fold r=4 scale=0.75"
    )
    assert ops["bert.encoder.layer.0.attention.self.key.weight"].is_copy
    classifier = next(e for e in result.plan.entries if e.name == "classifier.weight")
    assert classifier.op.is_copy and classifier.inputs[0].source == 1  # the adapter's copy
    # the base really changed: the fold is not a no-op
    before = load_file(base)
    assert not torch.allclose(before["bert.encoder.layer.0.output.dense.weight"],
                              out["bert.encoder.layer.0.output.dense.weight"])  # fmt: skip
    assert not torch.equal(before["classifier.weight"], out["classifier.weight"])


def test_rslora(tmp_path: Path) -> None:
    base, adapter, merged = bert_case(
        tmp_path, r=4, lora_alpha=8, use_rslora=True, target_modules=["query", "value"]
    )
    result = cs.fold_lora(base, adapter, tmp_path / "out.safetensors")
    assert_close_state(load_file(tmp_path / "out.safetensors"), merged)
    labels = {e.op.describe() for e in result.plan.entries if e.op.name == "lora-fold"}
    assert labels == {"lora-fold r=4 scale=4.0"}  # 8 / sqrt(4)


def test_fan_in_fan_out_gpt2_conv1d(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = GPT2Model(config).eval()
    model.save_pretrained(tmp_path / "base")
    merged = peft_lora(
        model,
        tmp_path / "adapter",
        r=4,
        lora_alpha=16,
        fan_in_fan_out=True,
        target_modules=["c_attn", "c_proj", "c_fc"],
    )
    result = cs.fold_lora(
        tmp_path / "base" / "model.safetensors", tmp_path / "adapter", tmp_path / "out.safetensors"
    )
    assert_close_state(load_file(tmp_path / "out.safetensors"), merged)
    folded = [e for e in result.plan.entries if e.op.name == "lora-fold"]
    assert len(folded) == 8
    assert folded[0].op.describe() == "lora-fold r=4 scale=4.0 fan-in-fan-out"


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.conv3 = nn.Conv2d(6, 4, (3, 5), bias=False)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.conv2(self.conv1(x)))
        return self.fc(x.mean((2, 3)))  # type: ignore[no-any-return]


def test_conv2d_1x1_and_kxk(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ConvNet()
    save_file(net.state_dict(), tmp_path / "base.safetensors")
    merged = peft_lora(
        net, tmp_path / "adapter", r=2, lora_alpha=6, target_modules=["conv1", "conv2", "conv3"]
    )
    result = cs.fold_lora(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "o.pt")
    out = torch.load(tmp_path / "o.pt", weights_only=True)
    assert_close_state(out, merged)
    labels = {e.name: e.op.describe() for e in result.plan.entries}
    assert labels["conv1.weight"] == "lora-fold r=2 scale=3.0 (conv)"
    assert labels["conv2.weight"] == "lora-fold r=2 scale=3.0 (conv)"


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.proj = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.emb(x))  # type: ignore[no-any-return]


def test_embedding_lora(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = Embedder()
    save_file(net.state_dict(), tmp_path / "base.safetensors")
    merged = peft_lora(net, tmp_path / "adapter", r=3, lora_alpha=3, target_modules=["emb", "proj"])
    result = cs.fold_lora(
        tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "out.safetensors"
    )
    assert_close_state(load_file(tmp_path / "out.safetensors"), merged)
    labels = {e.name: e.op.describe() for e in result.plan.entries}
    assert labels["emb.weight"] == "lora-fold r=3 scale=1.0 (embedding)"
    assert labels["proj.weight"] == "lora-fold r=3 scale=1.0"


def test_bin_adapter_through_the_restricted_loader(tmp_path: Path) -> None:
    base, adapter, merged = bert_case(
        tmp_path, r=4, lora_alpha=8, target_modules=BERT_TARGETS, safe_serialization=False
    )
    assert (adapter / "adapter_model.bin").is_file()
    assert not (adapter / "adapter_model.safetensors").exists()
    cs.fold_lora(base, adapter, tmp_path / "out.safetensors")
    assert_close_state(load_file(tmp_path / "out.safetensors"), merged)


@pytest.mark.filterwarnings("ignore:Adapter 'default'")  # peft takes 1-D lora_B.bias for a shard
def test_lora_bias_folds_into_the_base_bias(tmp_path: Path) -> None:
    base, adapter, merged = bert_case(
        tmp_path, r=4, lora_alpha=8, target_modules=["query", "value"], lora_bias=True
    )
    result = cs.fold_lora(base, adapter, tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    assert_close_state(out, merged)
    ops = {e.name: e.op for e in result.plan.entries}
    assert ops["bert.encoder.layer.0.attention.self.query.bias"].describe() == (
        "lora-fold r=4 scale=2.0 (bias)"
    )
    before = load_file(base)["bert.encoder.layer.0.attention.self.query.bias"]
    assert not torch.allclose(before, out["bert.encoder.layer.0.attention.self.query.bias"])


def test_bf16_base_stays_bf16(tmp_path: Path) -> None:
    model = tiny_bert().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    merged = peft_lora(model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=BERT_TARGETS)
    base = tmp_path / "base" / "model.safetensors"
    cs.fold_lora(base, tmp_path / "adapter", tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    # peft adds a delta rounded to bf16 in bf16; the fold adds in float32 and rounds once:
    # they agree to bf16's precision (2**-8 relative).
    for k, want in merged.items():
        assert torch.allclose(out[k].float(), want.float(), rtol=2**-7, atol=1e-3), k
    # and exactly to the float32 fold rounded once
    sd = load_file(base)
    ad = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    p = "bert.encoder.layer.0.intermediate.dense"
    a = ad[f"base_model.model.{p}.lora_A.weight"].float()
    b = ad[f"base_model.model.{p}.lora_B.weight"].float()
    want32 = sd[f"{p}.weight"].float() + 2.0 * (b @ a)
    assert torch.allclose(out[f"{p}.weight"].float(), want32.bfloat16().float(), atol=0, rtol=2**-8)


def test_dtype_casts_the_folded_and_the_copied(tmp_path: Path) -> None:
    base, adapter, merged = bert_case(
        tmp_path, r=4, lora_alpha=8, target_modules=BERT_TARGETS, modules_to_save=["classifier"]
    )
    result = cs.fold_lora(base, adapter, tmp_path / "out.safetensors", dtype="float16")
    out = load_file(tmp_path / "out.safetensors")
    assert all(t.dtype == torch.float16 for t in out.values())
    assert_close_state(out, {k: v.half() for k, v in merged.items()}, atol=2e-3)
    folded = [e.op for e in result.plan.entries if e.op.name == "lora-fold"]
    assert folded and all(op.describe().endswith(" ->float16") for op in folded)


def test_provenance_records_the_adapter(tmp_path: Path) -> None:
    base, adapter, _ = bert_case(
        tmp_path, r=4, lora_alpha=8, target_modules=["query"], modules_to_save=["classifier"]
    )
    cs.fold_lora(base, adapter, tmp_path / "out.safetensors")
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        meta = f.metadata()
    lora = json.loads(meta["ckptsurgery.lora"])
    sha = hashlib.sha256
    assert lora["config_sha256"] == sha((adapter / "adapter_config.json").read_bytes()).hexdigest()
    weights = adapter / "adapter_model.safetensors"
    assert lora["weights_sha256"] == sha(weights.read_bytes()).hexdigest()
    assert lora["r"] == 4 and lora["lora_alpha"] == 8 and lora["use_rslora"] is False
    assert lora["modules_to_save"] == ["classifier"]
    assert lora["folded"] == 2 and lora["replaced"] == 2
    names = [s["name"] for s in json.loads(meta["ckptsurgery.sources"])]
    assert names == ["model.safetensors", "adapter_model.safetensors"]
    ops = json.loads(meta["ckptsurgery.plan"])["ops"]
    fold = next(o for o in ops if o["op"] == "lora-fold")
    assert fold["scale"] == 2.0 and fold["count"] == 2


def test_library_in_a_dry_run_reads_no_tensor(tmp_path: Path) -> None:
    base, adapter, _ = bert_case(tmp_path, r=4, lora_alpha=8, target_modules=["query"])
    result = cs.fold_lora(base, adapter, None, dry_run=True)
    assert result.written is None
    assert [s.role for s in result.plan.sources] == ["source", "lora"]
    assert sum(e.op.name == "lora-fold" for e in result.plan.entries) == 2


# -- what cannot be folded: one error naming it, nothing written ------------------------------


def refused(tmp_path: Path, base: Path, adapter: Path, *fragments: str) -> None:
    out = tmp_path / "refused.safetensors"
    with pytest.raises(cs.LoraError) as info:
        cs.fold_lora(base, adapter, out)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("refused")) == []


def test_dora_is_refused(tmp_path: Path) -> None:
    base, adapter, _ = bert_case(
        tmp_path, r=4, lora_alpha=8, target_modules=["query"], use_dora=True
    )
    refused(tmp_path, base, adapter, "DoRA (use_dora) is not supported")


@pytest.mark.parametrize("method", ["IA3", "LOHA"])
def test_other_peft_methods_are_refused(tmp_path: Path, method: str) -> None:
    model = tiny_bert()
    model.save_pretrained(tmp_path / "base")
    if method == "IA3":
        config: Any = peft.IA3Config(target_modules=["query", "value"], feedforward_modules=[])
    else:
        config = peft.LoHaConfig(r=4, target_modules=["query"])
    peft_lora(model, tmp_path / "adapter", peft_config=config)
    refused(
        tmp_path,
        tmp_path / "base" / "model.safetensors",
        tmp_path / "adapter",
        f"peft_type {method!r} is not supported",
    )


def test_targets_missing_from_the_base_are_refused(tmp_path: Path) -> None:
    base, adapter, _ = bert_case(tmp_path, r=4, lora_alpha=8, target_modules=["query"])
    sd = load_file(base)
    save_file({k.removeprefix("bert."): v for k, v in sd.items()}, tmp_path / "renamed.safetensors")
    refused(
        tmp_path,
        tmp_path / "renamed.safetensors",
        adapter,
        "not in the base",
        "bert.encoder.layer.{0, 1}.attention.self.query.weight",
    )


def test_shape_mismatch_is_refused(tmp_path: Path) -> None:
    _, adapter, _ = bert_case(tmp_path, r=4, lora_alpha=8, target_modules=["query"])
    sd = load_file(tmp_path / "base" / "model.safetensors")
    key = "bert.encoder.layer.0.attention.self.query.weight"
    sd[key] = torch.zeros(16, 8)
    save_file(sd, tmp_path / "other.safetensors")
    refused(tmp_path, tmp_path / "other.safetensors", adapter, f"{key} is [16, 8]")


def test_rank_that_disagrees_with_the_config_is_refused(tmp_path: Path) -> None:
    base, adapter, _ = bert_case(tmp_path, r=4, lora_alpha=8, target_modules=["query"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 8
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    refused(tmp_path, base, adapter, "rank 4", "r=8")


def test_base_changing_init_is_refused(tmp_path: Path) -> None:
    base, adapter, _ = bert_case(tmp_path, r=4, lora_alpha=8, target_modules=["query"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    refused(tmp_path, base, adapter, "init_lora_weights='pissa'")


def test_missing_adapter_files(tmp_path: Path) -> None:
    base, adapter, _ = bert_case(tmp_path, r=4, lora_alpha=8, target_modules=["query"])
    refused(tmp_path, base, tmp_path / "nowhere", "does not exist")
    (adapter / "adapter_config.json").unlink()
    refused(tmp_path, base, adapter, "no adapter_config.json")
