"""compare(): the value diff of two checkpoints, as a library value."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ckptsurgery as cs
import ckptsurgery.compare
from ckptsurgery.compare import block_of, model_order


def model_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 16, generator=g),
        "blocks.0.attn.weight": torch.randn(16, 16, generator=g),
        "blocks.0.attn.bias": torch.randn(16, generator=g),
        "blocks.1.attn.weight": torch.randn(16, 16, generator=g),
        "blocks.1.attn.bias": torch.randn(16, generator=g),
        "head.weight": torch.randn(4, 16, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
    }


def reference_stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """The statistics in float64 torch, whole tensors at once: the reference."""
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    return {
        "max_abs": float((x - y).abs().max()),
        "rel_l2": float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y)),
        "cosine": float(torch.dot(x, y) / (torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y))),
    }  # fmt: skip


def test_identical_state_dicts_are_bit_equal() -> None:
    sd = model_sd()
    vd = cs.compare(sd, {k: v.clone() for k, v in sd.items()})
    assert all(t.bit_equal for t in vd.tensors)
    assert vd.overall.bit_equal == len(sd) and vd.overall.max_abs == 0 and vd.overall.rel_l2 == 0
    assert vd.passed and not vd.checked
    assert [t.name for t in vd.tensors] == list(sd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_statistics_agree_with_a_float64_reference(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunked (here 1000 elements a chunk) float64 sums agree with whole-tensor float64 torch
    within 1e-9 relative, for every input dtype, same-dtype and mixed."""
    monkeypatch.setattr(sys.modules["ckptsurgery.compare"], "CHUNK", 1000)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(123, 77, generator=g).to(dtype)
    b = (a.double() + 0.01 * torch.randn(123, 77, generator=g, dtype=torch.float64)).to(dtype)
    for other in (b, b.float()):  # the same dtype, and another one
        vd = cs.compare({"w": a}, {"w": other})
        t = vd.tensors[0]
        want = reference_stats(a, other)
        for stat, value in want.items():
            got = getattr(t, stat)
            assert got == pytest.approx(value, rel=1e-9, abs=0), stat
        assert vd.overall.rel_l2 == pytest.approx(want["rel_l2"], rel=1e-9)


def test_block_and_overall_statistics_are_the_sums_of_their_tensors() -> None:
    a = model_sd()
    b = model_sd(seed=1)
    vd = cs.compare(a, b)
    blocks = {blk.name: blk for blk in vd.blocks}
    cat_a = torch.cat([a["blocks.0.attn.weight"].reshape(-1), a["blocks.0.attn.bias"]])
    cat_b = torch.cat([b["blocks.0.attn.weight"].reshape(-1), b["blocks.0.attn.bias"]])
    want = reference_stats(cat_a, cat_b)
    assert blocks["blocks.0"].tensors == 2
    assert blocks["blocks.0"].rel_l2 == pytest.approx(want["rel_l2"], rel=1e-9)
    assert blocks["blocks.0"].cosine == pytest.approx(want["cosine"], rel=1e-9)
    assert blocks["blocks.0"].max_abs == pytest.approx(want["max_abs"], rel=1e-12)
    everything = reference_stats(
        torch.cat([v.double().reshape(-1) for v in a.values()]),
        torch.cat([v.double().reshape(-1) for v in b.values()]),
    )
    assert vd.overall.rel_l2 == pytest.approx(everything["rel_l2"], rel=1e-9)
    assert [blk.name for blk in vd.blocks] == ["embed", "blocks.0", "blocks.1", "head", "bn"]


def test_a_perturbed_tensor_fails_a_tolerance_and_is_named() -> None:
    a = model_sd()
    b = {k: v.clone() for k, v in a.items()}
    b["blocks.1.attn.bias"] = b["blocks.1.attn.bias"] + 1e-3
    vd = cs.compare(b, a, atol=1e-4)
    assert vd.checked and not vd.passed
    assert [t.name for t in vd.failures] == ["blocks.1.attn.bias"]
    failing = vd.failures[0]
    assert failing.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert failing.sums.outside == 16 and failing.sums.worst_ratio == pytest.approx(10, rel=1e-3)
    blocks = {blk.name: blk for blk in vd.blocks}
    assert blocks["blocks.1"].failed == 1 and blocks["blocks.0"].failed == 0
    assert blocks["blocks.1"].rel_l2 > 0 and blocks["blocks.0"].rel_l2 == 0
    # the same difference within a looser tolerance (and rtol alone: atol 0)
    assert cs.compare(b, a, atol=2e-3).passed
    assert not cs.compare(b, a, rtol=1e-6).passed
    assert not cs.compare(b, a, bit_equal=True).passed


def test_a_bfloat16_cast_differs_by_about_1e_3() -> None:
    a = model_sd()
    cast = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in a.items()}
    vd = cs.compare(cast, a)
    for t in vd.tensors:
        if t.name == "bn.num_batches_tracked":
            assert t.bit_equal and t.dtype_a == "int64"
            continue
        assert (t.dtype_a, t.dtype_b) == ("bfloat16", "float32")
        assert not t.bit_equal
        assert 1e-4 < t.rel_l2 < 1e-2, (t.name, t.rel_l2)  # type: ignore[operator]
        assert t.cosine is not None and t.cosine > 0.9999
        assert "dtype bfloat16 -> float32" in t.notes()
    assert 1e-4 < vd.overall.rel_l2 < 1e-2
    # values close enough for bfloat16's rounding: a tolerance check passes across dtypes
    assert cs.compare(cast, a, atol=1e-5, rtol=2**-8).passed
    assert not cs.compare(cast, a, bit_equal=True).passed


def test_nan_and_inf_are_counted_and_fail_a_check() -> None:
    a = model_sd()
    b = {k: v.clone() for k, v in a.items()}
    b["head.weight"][0, 0] = float("nan")
    b["head.weight"][1, 1] = float("inf")
    b["head.weight"][2, 2] = 0.5 + b["head.weight"][2, 2]
    vd = cs.compare(a, b, atol=1e-3)
    head = next(t for t in vd.tensors if t.name == "head.weight")
    assert (head.sums.nan_a, head.sums.nan_b, head.sums.inf_a, head.sums.inf_b) == (0, 1, 0, 1)
    # the finite positions are compared: the 0.5 shows, the NaN does not poison the numbers
    assert head.max_abs == pytest.approx(0.5, rel=1e-6)
    assert math.isfinite(head.rel_l2)  # type: ignore[arg-type]
    assert head.sums.outside == 3 and not head.passed
    assert vd.overall.sums.nan_b == 1 and vd.overall.sums.inf_b == 1
    # NaN in both at one place: unequal for assert_close, unless equal_nan
    both = {"w": torch.tensor([1.0, float("nan"), float("inf")])}
    assert not cs.compare(both, both, atol=0.1).passed
    assert cs.compare(both, both, atol=0.1, equal_nan=True).passed
    assert cs.compare(both, both, bit_equal=True).passed


def test_shape_and_key_differences_are_reported_not_crashed_on() -> None:
    a = model_sd()
    b = dict(a)
    b["head.weight"] = torch.zeros(5, 16)
    del b["embed.weight"]
    b["extra.weight"] = torch.zeros(2)
    vd = cs.compare(a, b)
    head = next(t for t in vd.tensors if t.name == "head.weight")
    assert not head.compared and head.max_abs is None and head.rel_l2 is None
    assert "shape [4, 16] vs [5, 16]: not compared" in head.notes()
    assert vd.only_in_a == ("embed.weight",) and vd.only_in_b == ("extra.weight",)
    assert vd.overall.not_compared == 1 and vd.passed  # no check: a report
    checked = cs.compare(a, b, atol=1.0)
    assert not checked.passed and [t.name for t in checked.failures] == ["head.weight"]
    assert checked.unpaired == ["embed.weight", "extra.weight"]
    allowed = cs.compare(a, b, atol=1.0, allow_unexpected=["embed.*"], allow_missing=["extra.*"])
    assert allowed.unpaired == []


def test_paths_checkpoints_rules_and_the_value_api(tmp_path: Path) -> None:
    sd = model_sd()
    save_file({f"module.{k}": v for k, v in sd.items()}, tmp_path / "a.safetensors")
    torch.save(sd, tmp_path / "b.pt")
    vd = cs.compare(
        tmp_path / "a.safetensors", str(tmp_path / "b.pt"), rules=cs.Rules(strip_prefix=["module."])
    )
    assert vd.overall.bit_equal == len(sd) and not vd.only_in_a
    assert vd.tensors[0].a_name == "module.embed.weight" and vd.tensors[0].name == "embed.weight"
    with cs.open_checkpoint(tmp_path / "b.pt") as ckpt:
        assert cs.compare(ckpt, sd).overall.bit_equal == len(sd)
        assert ckpt.tensor("head.weight").shape == (4, 16)  # not closed by compare
    payload = vd.to_json()
    json.dumps(payload, allow_nan=False)  # strict JSON
    assert payload["overall"]["bit_equal"] == len(sd)
    assert {t["key"] for t in payload["tensors"]} == set(sd)
    text = str(vd)
    assert "blocks.0" in text and "7 tensors compared; 7 bit-equal" in text


def test_tied_and_odd_dtypes(sd: dict[str, torch.Tensor]) -> None:
    """Every dtype the writers carry compares with itself as bit-equal, complex and float8
    included; NaN payloads are bytes like any other."""
    vd = cs.compare(sd, {k: v.clone() for k, v in sd.items()})
    assert all(t.bit_equal for t in vd.tensors), [t.name for t in vd.tensors if not t.bit_equal]
    assert vd.overall.sums.nan_a == vd.overall.sums.nan_b > 0


def test_sorting_and_top() -> None:
    a = model_sd()
    b = {k: v * (1 + 0.01 * i) for i, (k, v) in enumerate(a.items())}
    vd = cs.compare(b, a)
    by_rel = vd.sorted_tensors("rel_l2", top=2)
    assert [t.name for t in by_rel] == ["bn.num_batches_tracked", "head.weight"]
    assert vd.sorted_tensors("cosine")[0].cosine == min(t.cosine or 1 for t in vd.tensors)
    with pytest.raises(ValueError, match="unknown statistic"):
        vd.sorted_tensors("nope")


def test_blocks_follow_the_model() -> None:
    assert block_of("model.layers.10.mlp.up_proj.weight") == "model.layers.10"
    assert block_of("layer1.0.downsample.0.weight") == "layer1.0"
    assert block_of("patch_embed.proj.weight") == "patch_embed.proj"
    assert block_of("cls_token") == "cls_token"
    assert block_of("model.layers.10.mlp.up_proj.weight", depth=2) == "model.layers"
    # a file sorted by name: the numbered blocks of one stem in numeric order, in place
    assert model_order(["blocks.0", "blocks.1", "blocks.10", "blocks.2", "head", "norm"]) == [
        "blocks.0",
        "blocks.1",
        "blocks.2",
        "blocks.10",
        "head",
        "norm",
    ]


def test_negative_tolerance_is_refused() -> None:
    with pytest.raises(cs.CheckpointError, match="must not be negative"):
        cs.compare({}, {}, atol=-1)


def test_the_inputs_are_left_alone() -> None:
    """float64 chunks are views of the caller's tensors: nothing may write to them."""
    a = {"w": torch.tensor([-1.0, 2.0, -3.0], dtype=torch.float64)}
    b = {"w": torch.tensor([-1.5, 2.0, -3.5], dtype=torch.float64)}
    before = {k: v.clone() for k, v in (*a.items(), *(("b" + k, v) for k, v in b.items()))}
    cs.compare(a, b, atol=0.1, rtol=0.1)
    assert torch.equal(a["w"], before["w"])
    assert torch.equal(b["w"], before["bw"])
