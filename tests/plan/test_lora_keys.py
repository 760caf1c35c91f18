"""Adapters written by hand (no peft): the key forms peft has used (adapter names in keys,
``modules_to_save`` copies, the wrapped layer's ``base_layer`` tensors), the pattern matching of
``rank_pattern`` / ``alpha_pattern``, and adapters that are refused. The dry run reads no
tensor and never imports torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_without_torch
from safetensors.torch import load_file, save_file

import ckptsurgery as cs
from ckptsurgery.plan.lora import LoraConfig, LoraError, parse_config

P = "base_model.model."


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], **config: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    settings = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder


def base_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "fc.weight": torch.randn(6, 5, generator=g),
        "fc.bias": torch.randn(6, generator=g),
        "head.weight": torch.randn(3, 6, generator=g),
        "head.bias": torch.randn(3, generator=g),
        "steps": torch.tensor([7]),
    }


def test_named_adapter_keys_and_old_style_copies(tmp_path: Path) -> None:
    base = base_state()
    save_file(base, tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    head_w, fc_bias = torch.randn(3, 6, generator=g), torch.randn(6, generator=g)
    adapter = write_adapter(
        tmp_path / "ad",
        {
            f"{P}fc.lora_A.mine.weight": a,
            f"{P}fc.lora_B.mine.weight": b,
            f"{P}head.modules_to_save.weight": head_w,  # older peft kept the wrapper's name
            f"{P}fc.base_layer.bias": fc_bias,  # bias="all": the wrapped layer's own bias
        },
    )
    cs.fold_lora(tmp_path / "base.safetensors", adapter, tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    assert sorted(out) == sorted(base)
    assert torch.allclose(out["fc.weight"], base["fc.weight"] + 2.0 * b @ a, atol=1e-6)
    assert torch.equal(out["head.weight"], head_w)
    assert torch.equal(out["fc.bias"], fc_bias)
    assert torch.equal(out["head.bias"], base["head.bias"])
    assert torch.equal(out["steps"], base["steps"])


def test_dry_run_is_torch_free(tmp_path: Path) -> None:
    save_file(base_state(), tmp_path / "base.safetensors")
    write_adapter(
        tmp_path / "ad",
        {f"{P}fc.lora_A.weight": torch.ones(2, 5), f"{P}fc.lora_B.weight": torch.ones(6, 2)},
    )
    proc = run_without_torch(
        'cli("merge", "base.safetensors", "--lora", "ad", "--dry-run")', cwd=tmp_path
    )
    assert "lora-fold r=2 scale=2.0" in proc.stdout


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (
            {
                f"{P}fc.lora_A.x.weight": torch.ones(2, 5),
                f"{P}fc.lora_B.y.weight": torch.ones(6, 2),
            },
            "holds several adapters (x, y)",
        ),
        ({f"{P}fc.lora_A.weight": torch.ones(2, 5)}, "fc has lora_A but no lora_B"),
        (
            {
                f"{P}fc.lora_A.weight": torch.ones(2, 5),
                f"{P}fc.lora_B.weight": torch.ones(6, 2),
                f"{P}fc.lora_magnitude_vector": torch.ones(6),
            },
            "of no LoRA kind this can fold",
        ),
        (
            {f"{P}fc.lora_A.weight": torch.ones(2), f"{P}fc.lora_B.weight": torch.ones(6, 2)},
            "no Linear, Conv or Embedding LoRA",
        ),
        (
            {
                f"{P}steps.lora_A.weight": torch.ones(2, 1),
                f"{P}steps.lora_B.weight": torch.ones(1, 2),
            },
            "not in the base",
        ),
    ],
)
def test_refused(tmp_path: Path, tensors: dict[str, torch.Tensor], message: str) -> None:
    save_file(base_state(), tmp_path / "base.safetensors")
    adapter = write_adapter(tmp_path / "ad", tensors)
    with pytest.raises(LoraError) as info:
        cs.fold_lora(tmp_path / "base.safetensors", adapter, tmp_path / "out.safetensors")
    assert message in str(info.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_patterns_match_as_peft_does() -> None:
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        rank_pattern={"layers.1.attn.q": 4, "v": 2},
        alpha_pattern={r"layers\.\d\.mlp.*": 3},
    )
    assert config.rank_alpha("model.layers.1.attn.q") == (4, 16)
    assert config.rank_alpha("model.layers.11.attn.q") == (8, 16)  # the end, at a dot
    assert config.rank_alpha("model.layers.0.attn.v") == (2, 16)
    assert config.rank_alpha("model.layers.0.attn.kv") == (8, 16)
    assert config.rank_alpha("model.layers.0.mlp.up") == (8, 3)
    assert config.scale(4, 16) == 4.0
    assert LoraConfig(r=4, lora_alpha=8, use_rslora=True).scale(4, 8) == 4.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peft_type": "LOKR"}, "peft_type 'LOKR' is not supported"),
        ({"use_dora": True}, "DoRA (use_dora)"),
        ({"trainable_token_indices": [1, 2]}, "trainable tokens"),
        ({"init_lora_weights": "olora"}, "changed the base weights"),
        ({"r": 0}, "r must be a positive integer"),
        ({"rank_pattern": {"q": "four"}}, "rank_pattern must map"),
    ],
)
def test_config_refusals(changes: dict[str, object], message: str) -> None:
    data = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, **changes}
    with pytest.raises(LoraError) as info:
        parse_config(data)
    assert message in str(info.value)


def test_tied_base_tensors_are_folded_under_every_name(tmp_path: Path) -> None:
    emb = torch.randn(10, 4)
    torch.save({"emb.weight": emb, "head.weight": emb, "other": torch.ones(2)}, tmp_path / "b.pt")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 10, generator=g), torch.randn(4, 2, generator=g)
    adapter = write_adapter(
        tmp_path / "ad", {f"{P}emb.lora_embedding_A": a, f"{P}emb.lora_embedding_B": b}
    )
    result = cs.fold_lora(tmp_path / "b.pt", adapter, tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.allclose(out["emb.weight"], emb + 2.0 * (b @ a).T, atol=1e-6)
    assert out["head.weight"].data_ptr() == out["emb.weight"].data_ptr()  # still one tensor
    assert result.plan.ties == {"head.weight": "emb.weight"}
