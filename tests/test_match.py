"""match() and load_into(): exact key sets for real torchvision models, and no silent loading."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import raw
from safetensors.torch import save_file
from torch import nn
from torchvision.models import resnet18

from ckptsurgery.errors import CheckpointError, FormatError, IncompatibleCheckpoint
from ckptsurgery.io import TensorInfo, open_checkpoint
from ckptsurgery.io.dtypes import info_of
from ckptsurgery.loading import load_into
from ckptsurgery.match import DtypeMismatch, MatchReport, ShapeMismatch, match
from ckptsurgery.models import build_model
from ckptsurgery.rules import UnusedPatternWarning
from ckptsurgery.surgery import save_state_dict

# --- helpers and models ---------------------------------------------------------------------


def meta(spec: str, **model_args: Any) -> nn.Module:
    built = build_model(spec, model_args)
    assert built.on_meta
    return built.module


def infos(model: nn.Module) -> dict[str, TensorInfo]:
    """A checkpoint's view of a (meta) model: names, shapes and dtypes, no data."""
    return {k: info_of(v) for k, v in model.state_dict().items()}


def snapshot(model: nn.Module) -> dict[str, bytes]:
    return {k: raw(v) for k, v in model.state_dict().items()}


def randomized(sd: Mapping[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """The same keys, shapes and dtypes with different values, so that a load is visible."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.is_floating_point():
            out[k] = torch.randn(v.shape, generator=g, dtype=v.dtype)
        else:
            out[k] = torch.full_like(v, 7)
    return out


class TinyLM(nn.Module):
    """Tied embedding / output weights and a non-persistent buffer."""

    def __init__(self, vocab: int = 11, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight
        self.register_buffer("rope_cache", torch.zeros(3), persistent=False)


class IgnoresItsWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        pass  # a buggy module that silently takes nothing


@pytest.fixture(scope="module")
def r18_sd() -> dict[str, torch.Tensor]:
    """A real resnet18 state dict (random init), with values unlike a fresh model's."""
    torch.manual_seed(0)
    return randomized(resnet18(weights=None).state_dict(), seed=1)


@pytest.fixture
def r18_cpu() -> nn.Module:
    torch.manual_seed(2)
    return resnet18(weights=None)


FC = ["fc.weight", "fc.bias"]

# --- match: real models ---------------------------------------------------------------------


def test_perfect_match(r18_sd: dict[str, torch.Tensor]) -> None:
    model = meta("torchvision:resnet18")
    report = match(r18_sd, model)
    assert report.compatible
    assert report.matched == list(model.state_dict())
    assert report.missing == report.unexpected == report.shape_mismatch == []
    assert report.dtype_mismatch == [] and report.tied_aliases == []
    assert report.model_tensors == report.checkpoint_tensors == 122
    assert report.matched_params == report.model_params == sum(v.numel() for v in r18_sd.values())


def test_module_prefix_makes_everything_missing_and_unexpected(
    r18_sd: dict[str, torch.Tensor],
) -> None:
    model = meta("torchvision:resnet18")
    ckpt = {f"module.{k}": v for k, v in r18_sd.items()}
    report = match(ckpt, model)
    assert not report.compatible
    assert report.matched == []
    assert report.missing == list(model.state_dict())
    assert report.unexpected == list(ckpt)
    assert report.shape_mismatch == []
    assert report.matched_params == 0
    assert "rename the keys" in report.fixes()


def test_changed_head_is_a_shape_mismatch_that_no_glob_allows() -> None:
    report = match(
        infos(meta("torchvision:resnet18", num_classes=10)), meta("torchvision:resnet18")
    )
    assert report.shape_mismatch == [
        ("fc.weight", (10, 512), (1000, 512)),
        ("fc.bias", (10,), (1000,)),
    ]
    assert isinstance(report.shape_mismatch[0], ShapeMismatch)
    assert report.missing == report.unexpected == []
    assert len(report.matched) == 120
    assert not report.compatible
    with pytest.warns(UnusedPatternWarning, match="glob '\\*' matched no key"):
        everything = match(
            infos(meta("torchvision:resnet18", num_classes=10)),
            meta("torchvision:resnet18"),
            allow_missing=["*"],
            allow_unexpected=["*"],
        )
    assert not everything.compatible
    assert "drop_mismatched=True" in everything.fixes()


def test_drop_mismatched_turns_them_into_missing() -> None:
    ckpt = infos(meta("torchvision:resnet18", num_classes=10))
    model = meta("torchvision:resnet18")
    report = match(ckpt, model, drop_mismatched=True)
    assert report.shape_mismatch == []
    assert report.missing == FC
    assert report.dropped_mismatched == [
        ("fc.weight", (10, 512), (1000, 512)),
        ("fc.bias", (10,), (1000,)),
    ]
    assert not report.compatible
    assert match(ckpt, model, drop_mismatched=True, allow_missing=["fc.*"]).compatible


def test_backbone_only_checkpoint_misses_exactly_the_head() -> None:
    model = meta("torchvision:resnet50")
    backbone = {k: v for k, v in infos(model).items() if not k.startswith("fc.")}
    report = match(backbone, model)
    assert report.missing == FC
    assert report.unexpected == report.shape_mismatch == []
    assert not report.compatible
    allowed = match(backbone, model, allow_missing=["fc.*"])
    assert allowed.compatible
    assert allowed.missing == allowed.allowed_missing == FC
    assert allowed.disallowed_missing == []
    assert allowed.matched_params == allowed.model_params - (1000 * 2048 + 1000)


def test_vit_with_a_new_head() -> None:
    report = match(
        infos(meta("torchvision:vit_b_16", num_classes=10)), meta("torchvision:vit_b_16")
    )
    assert report.shape_mismatch == [
        ("heads.head.weight", (10, 768), (1000, 768)),
        ("heads.head.bias", (10,), (1000,)),
    ]
    assert report.missing == report.unexpected == []
    assert not report.compatible


def test_checkpoint_is_matched_from_its_header(
    tmp_path: Path, r18_sd: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "r18.safetensors"
    save_file({k: v for k, v in r18_sd.items() if not k.startswith("fc.")}, str(path))
    with open_checkpoint(path) as ckpt:

        def no_reading(*args: object) -> None:
            raise AssertionError("match read tensor data")

        monkeypatch.setattr(ckpt, "tensor", no_reading)
        monkeypatch.setattr(ckpt, "raw_bytes", no_reading)
        report = match(ckpt, meta("torchvision:resnet18"), allow_missing="fc.*")
    assert report.compatible and report.missing == FC


def test_against_another_state_dict_or_checkpoint(
    tmp_path: Path, r18_sd: dict[str, torch.Tensor]
) -> None:
    ref = {k: v for k, v in r18_sd.items() if k != "fc.bias"}
    report = match(r18_sd, ref)
    assert report.unexpected == ["fc.bias"] and report.missing == []
    path = tmp_path / "ref.safetensors"
    save_file(ref, str(path))
    with open_checkpoint(path) as ckpt:
        assert match(r18_sd, ckpt).unexpected == ["fc.bias"]
        assert match(ckpt, r18_sd).missing == ["fc.bias"]
    assert match(r18_sd, build_model("torchvision:resnet18")).compatible  # a BuiltModel


# --- match: BatchNorm, buffers, ties, dtypes ------------------------------------------------


def test_num_batches_tracked_is_expected_when_the_model_has_it(
    r18_sd: dict[str, torch.Tensor],
) -> None:
    model = meta("torchvision:resnet18")
    old = {k: v for k, v in r18_sd.items() if not k.endswith("num_batches_tracked")}
    report = match(old, model)
    expected = [k for k in model.state_dict() if k.endswith(".num_batches_tracked")]
    assert len(expected) == 20
    assert report.missing == expected
    assert "allow_missing=['*.num_batches_tracked']" in report.fixes()
    assert match(old, model, allow_missing=["*.num_batches_tracked"]).compatible


def test_batchnorm_without_running_stats_does_not_expect_them() -> None:
    tracked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    untracked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    report = match(tracked.state_dict(), untracked)
    assert report.unexpected == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert report.missing == []


def test_non_persistent_buffers_are_not_expected() -> None:
    model = TinyLM()
    sd = model.state_dict()
    assert "rope_cache" not in sd
    assert match(sd, model).compatible
    report = match({**sd, "rope_cache": torch.zeros(3)}, model)
    assert report.unexpected == ["rope_cache"]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_tied_alias_is_not_missing_when_its_partner_matches(device: str) -> None:
    with torch.device(device):
        model = TinyLM()
    ckpt = {
        "embed.weight": torch.zeros(11, 4),
        "norm.weight": torch.ones(4),
        "norm.bias": torch.zeros(4),
    }
    report = match(ckpt, model)
    assert report.compatible
    assert report.missing == []
    assert report.tied_aliases == ["lm_head.weight"]
    assert report.tied_to == {"lm_head.weight": "embed.weight"}
    assert report.model_params == report.matched_params == 11 * 4 + 4 + 4  # tied counted once
    assert "+1 tied alias" in report.summary()

    only_head = {
        "lm_head.weight": torch.zeros(11, 4),
        "norm.weight": torch.ones(4),
        "norm.bias": torch.zeros(4),
    }
    report = match(only_head, model)
    assert report.compatible and report.tied_aliases == ["embed.weight"]

    report = match({"norm.weight": torch.ones(4), "norm.bias": torch.zeros(4)}, model)
    assert report.missing == ["embed.weight", "lm_head.weight"]
    assert report.tied_aliases == []


def test_ties_are_seen_in_a_real_state_dict_too() -> None:
    ref = TinyLM().state_dict()  # detached tensors that share one storage
    report = match(
        {
            "embed.weight": torch.zeros(11, 4),
            "norm.weight": torch.ones(4),
            "norm.bias": torch.zeros(4),
        },
        ref,
    )
    assert report.tied_aliases == ["lm_head.weight"]


def test_dtype_differences_are_informational(r18_sd: dict[str, torch.Tensor]) -> None:
    half = {k: v.half() if v.is_floating_point() else v for k, v in r18_sd.items()}
    report = match(half, meta("torchvision:resnet18"))
    assert report.compatible
    assert len(report.dtype_mismatch) == 102
    assert report.dtype_mismatch[0] == DtypeMismatch("conv1.weight", "float16", "float32")


def test_globs_match_across_dots_and_a_single_string_is_one_glob() -> None:
    model = meta("torchvision:resnet18")
    ckpt = {k: v for k, v in infos(model).items() if not k.startswith("layer4")}
    assert match(ckpt, model, allow_missing=["layer4*"]).compatible
    assert match(ckpt, model, allow_missing="layer4.*").compatible
    assert not match(ckpt, model, allow_missing=["layer4.?.conv1.weight"]).compatible


def test_allow_unexpected_and_unused_globs() -> None:
    model = meta("torchvision:resnet18")
    ckpt = {**infos(model), "queue": TensorInfo((128, 65536), "float32", 128 * 65536 * 4)}
    with pytest.warns(UnusedPatternWarning) as caught:
        report = match(ckpt, model, allow_unexpected=["queue", "teacher.*"], allow_missing=["fc.*"])
    assert report.compatible
    assert report.unexpected == report.allowed_unexpected == ["queue"]
    assert report.unused_allow() == ["fc.*", "teacher.*"]
    assert (
        [str(w.message) for w in caught]
        == report.notes()
        == [
            "allow_missing glob 'fc.*' matched no key",
            "allow_unexpected glob 'teacher.*' matched no key",
        ]
    )


def test_bad_inputs() -> None:
    with pytest.raises(FormatError, match=r"'epoch' maps to a int"):
        match({"epoch": 3}, TinyLM())  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"model must be"):
        match({}, 42)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match=r"non-empty string"):
        match({}, TinyLM(), allow_missing=[""])


# --- the report as JSON and text ------------------------------------------------------------


def test_json_has_the_contract_keys() -> None:
    report = match(
        infos(meta("torchvision:resnet18", num_classes=10)), meta("torchvision:resnet18")
    )
    data = report.to_json()
    assert {
        "compatible",
        "matched",
        "missing",
        "unexpected",
        "shape_mismatch",
        "dtype_mismatch",
    } <= set(data)
    assert data["compatible"] is False
    assert data["shape_mismatch"] == [
        {"key": "fc.weight", "checkpoint": [10, 512], "model": [1000, 512]},
        {"key": "fc.bias", "checkpoint": [10], "model": [1000]},
    ]
    assert data["missing"] == [] and data["unexpected"] == [] and data["dtype_mismatch"] == []
    assert len(data["matched"]) == 120
    assert json.loads(json.dumps(data)) == data


def test_json_dtype_mismatch_entries() -> None:
    ckpt = {"w": TensorInfo((2,), "bfloat16", 4)}
    data = match(ckpt, {"w": TensorInfo((2,), "float32", 8)}).to_json()
    assert data["dtype_mismatch"] == [{"key": "w", "checkpoint": "bfloat16", "model": "float32"}]
    assert data["compatible"] is True


def test_summary_line() -> None:
    model = meta("torchvision:resnet18")
    ckpt = {k: v for k, v in infos(model).items() if not k.startswith("fc.")}
    assert match(ckpt, model, allow_missing=["fc.*"]).summary() == (
        "matched 120 of 122 model tensors (95.6% of parameters); "
        "missing 2 (2 allowed), unexpected 0, shape mismatch 0 -> compatible"
    )
    assert match(ckpt, model).summary().endswith("-> INCOMPATIBLE")


def test_table_groups_keys_and_ends_with_the_summary() -> None:
    model = meta("torchvision:resnet18")
    ckpt = {k: v for k, v in infos(meta("torchvision:resnet18", num_classes=10)).items()}
    ckpt = {("module." + k if k.startswith("layer4.1") else k): v for k, v in ckpt.items()}
    text = match(ckpt, model, allow_unexpected=["module.*"]).table()
    assert text == "\n".join(
        [
            "missing: in the model, not in the checkpoint (12):",
            "  layer4.1.conv{1, 2}.weight",
            "  layer4.1.bn{1, 2}.{bias, num_batches_tracked, running_mean, running_var, weight}",
            "",
            "unexpected: in the checkpoint, not in the model (12):",
            "  module.layer4.1.conv{1, 2}.weight  (allowed)",
            "  module.layer4.1.bn{1, 2}.{bias, num_batches_tracked, running_mean, running_var, "
            "weight}  (allowed)",
            "",
            "shape mismatch (2):",
            "  key        checkpoint    model",
            "  ---------  ------------  -----------",
            "  fc.weight  [10, 512]     [1000, 512]",
            "  fc.bias    [10]          [1000]",
            "",
            "matched 108 of 122 model tensors (55.2% of parameters); "
            "missing 12, unexpected 12 (12 allowed), shape mismatch 2 -> INCOMPATIBLE",
        ]
    )


# --- load_into ------------------------------------------------------------------------------


def test_load_into_loads_and_verifies(r18_sd: dict[str, torch.Tensor], r18_cpu: nn.Module) -> None:
    before_keys = list(r18_sd)
    before_ids = [id(v) for v in r18_sd.values()]
    report = load_into(r18_cpu, r18_sd)
    assert isinstance(report, MatchReport) and report.compatible
    assert snapshot(r18_cpu) == {k: raw(v) for k, v in r18_sd.items()}
    assert list(r18_sd) == before_keys and [id(v) for v in r18_sd.values()] == before_ids


def test_load_into_refuses_and_touches_nothing(
    r18_sd: dict[str, torch.Tensor], r18_cpu: nn.Module
) -> None:
    before = snapshot(r18_cpu)
    prefixed = {f"module.{k}": v for k, v in r18_sd.items()}
    with pytest.raises(
        IncompatibleCheckpoint, match=r"122 missing keys .*Nothing was loaded"
    ) as err:
        load_into(r18_cpu, prefixed)
    assert isinstance(err.value.report, MatchReport)
    assert err.value.report.unexpected == list(prefixed)
    assert snapshot(r18_cpu) == before

    # Everything but fc matches; still nothing may be loaded while fc is missing.
    no_fc = {k: v for k, v in r18_sd.items() if not k.startswith("fc.")}
    with pytest.raises(IncompatibleCheckpoint, match=r"2 missing keys \(fc.\{bias, weight\}\)"):
        load_into(r18_cpu, no_fc)
    assert snapshot(r18_cpu) == before


def test_load_into_with_a_new_head(r18_sd: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(3)
    ten_class = randomized(resnet18(weights=None, num_classes=10).state_dict(), seed=4)
    model = resnet18(weights=None)
    before = snapshot(model)
    with pytest.raises(
        IncompatibleCheckpoint,
        match=r"2 shape mismatches \(fc.weight: checkpoint \[10, 512\], model \[1000, 512\]",
    ):
        load_into(model, ten_class)
    with pytest.raises(IncompatibleCheckpoint, match=r"allow_missing=\['fc.\*'\]"):
        load_into(model, ten_class, drop_mismatched=True)
    assert snapshot(model) == before

    report = load_into(model, ten_class, drop_mismatched=True, allow_missing=["fc.*"])
    assert report.missing == FC and [m.key for m in report.dropped_mismatched] == FC
    after = snapshot(model)
    for k, v in ten_class.items():
        if k.startswith("fc."):
            assert after[k] == before[k]  # the model's own head is kept
            assert len(ten_class[k]) == 10  # and the caller's dict still has its own
        else:
            assert after[k] == raw(v)


def test_load_into_from_an_open_checkpoint(
    tmp_path: Path, r18_sd: dict[str, torch.Tensor], r18_cpu: nn.Module
) -> None:
    path = tmp_path / "r18.safetensors"
    save_file(r18_sd, str(path))
    with open_checkpoint(path) as ckpt:
        load_into(r18_cpu, ckpt)
    assert snapshot(r18_cpu) == {k: raw(v) for k, v in r18_sd.items()}


def test_load_into_casts_to_the_model_dtype(
    r18_sd: dict[str, torch.Tensor], r18_cpu: nn.Module
) -> None:
    half = {k: v.half() if v.is_floating_point() else v for k, v in r18_sd.items()}
    report = load_into(r18_cpu, half)
    assert len(report.dtype_mismatch) == 102
    after = r18_cpu.state_dict()
    assert all(raw(after[k]) == raw(v.to(after[k].dtype)) for k, v in half.items())


def test_load_into_keeps_state_dict_metadata() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    sd = OrderedDict(randomized(model.state_dict()))
    sd._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
    target = nn.Sequential(nn.BatchNorm1d(3))
    load_into(target, sd)
    assert raw(target.state_dict()["0.num_batches_tracked"]) == raw(sd["0.num_batches_tracked"])


def test_load_into_a_meta_model_is_refused(r18_sd: dict[str, torch.Tensor]) -> None:
    with pytest.raises(CheckpointError, match=r"meta device.*device='cpu'"):
        load_into(meta("torchvision:resnet18"), r18_sd)


def test_load_into_needs_tensors() -> None:
    model = TinyLM()
    with pytest.raises(FormatError, match=r"needs tensors"):
        load_into(model, infos(model))  # type: ignore[arg-type]


def test_load_into_a_tied_model() -> None:
    model = TinyLM()
    embed = torch.arange(44, dtype=torch.float32).reshape(11, 4)
    load_into(
        model, {"embed.weight": embed, "norm.weight": torch.ones(4), "norm.bias": torch.zeros(4)}
    )
    assert raw(model.lm_head.weight) == raw(embed)
    assert model.lm_head.weight is model.embed.weight

    # Both tied names with the same values load; different values are refused.
    same = {
        "embed.weight": embed,
        "lm_head.weight": embed.clone(),
        "norm.weight": torch.ones(4),
        "norm.bias": torch.zeros(4),
    }
    assert load_into(TinyLM(), same).compatible
    fresh = TinyLM()
    before = snapshot(fresh)
    different = {**same, "lm_head.weight": embed + 1}
    with pytest.raises(IncompatibleCheckpoint, match=r"ties 'embed.weight' and 'lm_head.weight'"):
        load_into(fresh, different)
    assert snapshot(fresh) == before


def test_load_into_notices_a_tensor_that_did_not_land() -> None:
    model = nn.Sequential(IgnoresItsWeights())
    with pytest.raises(IncompatibleCheckpoint, match=r"do not hold the checkpoint's values"):
        load_into(model, {"0.w": torch.ones(3)})


def test_lazy_model_is_refused_with_a_hint() -> None:
    with pytest.raises(CheckpointError, match=r"lazy.*forward pass"):
        match({}, nn.Sequential(nn.LazyLinear(3)))


def test_empty_model_summary() -> None:
    report = match({}, nn.Sequential())
    assert report.compatible
    assert report.summary() == (
        "matched 0 of 0 model tensors (n/a of parameters); "
        "missing 0, unexpected 0, shape mismatch 0 -> compatible"
    )


def test_ties_recorded_in_a_checkpoint_file(tmp_path: Path) -> None:
    path = tmp_path / "lm.safetensors"
    save_state_dict(TinyLM().state_dict(), path)
    head_only = {"lm_head.weight": torch.zeros(11, 4), "norm.weight": torch.ones(4)}
    with open_checkpoint(path) as ref:
        assert ref.aliases  # ckptsurgery records the tie
        report = match({**head_only, "norm.bias": torch.zeros(4)}, ref)
    assert report.compatible and report.tied_aliases == ["embed.weight"]
