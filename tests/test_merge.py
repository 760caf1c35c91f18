"""Merging and averaging: in memory (cs.merge, cs.average) and file to file, tensor by tensor."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyNet, assert_bit_exact, assert_tied, raw, safetensors_header, source_digest
from safetensors.torch import load_file, save_file
from torch import nn

import ckptsurgery as cs
from ckptsurgery.io import safetensors_format as stf
from ckptsurgery.merge import MergeConflictError, MergeError, SourceSpec
from ckptsurgery.plan.execute import PlanSource


def net_state(
    seed: int, dtype: torch.dtype = torch.float32, *, steps: int = 100
) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = TinyNet()
    for p in net.parameters():
        nn.init.normal_(p)
    net.bn.running_mean.normal_()
    net.bn.num_batches_tracked.fill_(steps)
    return {
        k: (v.to(dtype) if v.is_floating_point() else v).clone()
        for k, v in net.state_dict().items()
    }


def snapshot(sds: list[dict[str, torch.Tensor]]) -> list[dict[str, bytes]]:
    return [{k: raw(v) for k, v in sd.items()} for sd in sds]


# --- merge in memory ------------------------------------------------------------------------


def test_merge_is_the_union_and_leaves_inputs_alone() -> None:
    full = net_state(0)
    backbone = {k: v for k, v in full.items() if not k.startswith("fc.")}
    head = {k: v for k, v in full.items() if k.startswith("fc.")}
    before = snapshot([backbone, head])
    merged = cs.merge([backbone, head])
    assert list(merged) == list(backbone) + list(head)
    assert_bit_exact(merged, {**backbone, **head})
    assert snapshot([backbone, head]) == before
    assert list(backbone) == [k for k in full if not k.startswith("fc.")]
    model = TinyNet()
    model.load_state_dict(merged, strict=True)


def test_merge_conflict_refused_by_default() -> None:
    a, b = net_state(0), net_state(1)
    with pytest.raises(MergeConflictError, match=r"state dict 1 and state dict 2.*fc\.") as e:
        cs.merge([a, b])
    assert set(e.value.conflicts) == set(a)
    assert e.value.conflicts["fc.weight"] == ("state dict 1", "state dict 2")
    assert isinstance(e.value, cs.CheckpointError)


@pytest.mark.parametrize(("policy", "winner"), [("first", 0), ("last", 2)])
def test_merge_conflict_first_or_last(policy: str, winner: int) -> None:
    sds = [{"x": torch.tensor([float(i)]), f"only{i}": torch.tensor([i])} for i in range(3)]
    merged = cs.merge(sds, on_conflict=policy)
    assert list(merged) == ["x", "only0", "only1", "only2"]
    assert raw(merged["x"]) == raw(sds[winner]["x"])


def test_merge_unknown_policy() -> None:
    with pytest.raises(MergeError, match="error, first, last"):
        cs.merge([{}, {}], on_conflict="newest")


def test_merge_keeps_ties() -> None:
    w = torch.randn(4, 2)
    merged = cs.merge([{"embed.weight": w, "lm_head.weight": w}, {"norm.weight": torch.ones(2)}])
    assert_tied(merged, "embed.weight", "lm_head.weight")


# --- average in memory ----------------------------------------------------------------------


def test_average_is_the_weighted_mean_float32() -> None:
    sds = [net_state(i) for i in range(3)]
    before = snapshot(sds)
    soup = cs.average(sds, weights=[1, 2, 5])
    w = [1 / 8, 2 / 8, 5 / 8]
    for k in ("conv.weight", "bn.running_mean", "fc.bias"):
        want = sum(wi * sd[k].double() for wi, sd in zip(w, sds, strict=True))
        assert soup[k].dtype == torch.float32
        torch.testing.assert_close(soup[k].double(), want, rtol=1e-6, atol=1e-6)
    assert snapshot(sds) == before  # inputs untouched


def test_average_equal_weights_by_default() -> None:
    a, b = {"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0, 6.0])}
    assert cs.average([a, b])["x"].tolist() == [2.0, 4.0]
    assert cs.average([a, b], weights=[])["x"].tolist() == [2.0, 4.0]
    assert cs.average([a, b], weights=[3, 1])["x"].tolist() == [1.5, 3.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_average_keeps_half_dtypes(dtype: torch.dtype) -> None:
    sds = [net_state(i, dtype) for i in range(3)]
    soup = cs.average(sds)
    for k, v in soup.items():
        if sds[0][k].is_floating_point():
            assert v.dtype == dtype, k
            want = sum(sd[k].float() for sd in sds) / 3
            # one rounding to the half dtype, from a float32 accumulation
            torch.testing.assert_close(v, want.to(dtype))  # within one rounding of the dtype


def test_average_float64_accumulates_in_float64() -> None:
    # 1 + 2**-40 is lost in float32; the float64 mean keeps it.
    a = {"x": torch.tensor([1.0 + 2**-40], dtype=torch.float64)}
    b = {"x": torch.tensor([1.0 + 2**-40], dtype=torch.float64)}
    out = cs.average([a, b])["x"]
    assert out.dtype == torch.float64
    assert out.item() == 1.0 + 2**-40


def test_average_copies_integer_buffers_from_the_first() -> None:
    sds = [net_state(i, steps=100 + i) for i in range(3)]
    with pytest.warns(UserWarning, match=r"bn\.num_batches_tracked.*state dict 1"):
        soup = cs.average(sds)
    assert soup["bn.num_batches_tracked"].dtype == torch.int64
    assert raw(soup["bn.num_batches_tracked"]) == raw(sds[0]["bn.num_batches_tracked"])


def test_average_agreeing_integers_say_nothing(recwarn: pytest.WarningsRecorder) -> None:
    sds = [{"n": torch.tensor(7), "x": torch.tensor([float(i)])} for i in range(2)]
    soup = cs.average(sds)
    assert soup["n"].item() == 7
    assert not recwarn.list


def test_average_refuses_different_keys_naming_them() -> None:
    a = net_state(0)
    b = {k: v for k, v in net_state(1).items() if not k.startswith("fc.")}
    b["extra.weight"] = torch.zeros(1)
    with pytest.raises(MergeError) as e:
        cs.average([a, b])
    msg = str(e.value)
    assert "2 keys only in state dict 1 (fc.{bias, weight})" in msg
    assert "1 key only in state dict 2 (extra.weight)" in msg


def test_average_refuses_different_shapes_naming_them() -> None:
    a, b = {"fc.weight": torch.zeros(3, 4)}, {"fc.weight": torch.zeros(5, 4)}
    with pytest.raises(MergeError, match=r"fc\.weight has different shapes .*\[3, 4\].*\[5, 4\]"):
        cs.average([a, b])


def test_average_refuses_float_with_integer() -> None:
    a, b = {"x": torch.zeros(2)}, {"x": torch.zeros(2, dtype=torch.int64)}
    with pytest.raises(MergeError, match=r"x cannot be averaged across dtypes"):
        cs.average([a, b])


def test_average_mixed_float_dtypes_stored_as_the_first() -> None:
    a, b = {"x": torch.tensor([1.0])}, {"x": torch.tensor([2.0], dtype=torch.bfloat16)}
    with pytest.warns(UserWarning, match="stored as float32"):
        out = cs.average([a, b])
    assert out["x"].dtype == torch.float32 and out["x"].item() == 1.5


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0], "1 weight for 2 sources"),
        ([1.0, 2.0, 3.0], "3 weights for 2 sources"),
        ([1.0, 0.0], "not a positive number"),
        ([1.0, -1.0], "not a positive number"),
        ([1.0, math.nan], "not a positive number"),
        ([1.0, math.inf], "not a positive number"),
        ([1.0, True], "not a number"),
        ([1.0, "2"], "not a number"),
    ],
)
def test_average_bad_weights(weights: list[Any], message: str) -> None:
    sds = [{"x": torch.zeros(1)}, {"x": torch.ones(1)}]
    with pytest.raises(MergeError, match=message):
        cs.average(sds, weights=weights)


def test_average_keeps_ties_held_by_every_source() -> None:
    sds = []
    for i in range(2):
        w = torch.full((2, 2), float(i))
        sds.append({"embed.weight": w, "lm_head.weight": w, "b": torch.zeros(1)})
    soup = cs.average(sds)
    assert_tied(soup, "embed.weight", "lm_head.weight")
    assert soup["embed.weight"].tolist() == [[0.5, 0.5], [0.5, 0.5]]
    # tied in one source only: two tensors, each its own mean
    sds[1] = {**sds[1], "lm_head.weight": torch.full((2, 2), 3.0)}
    soup = cs.average(sds)
    assert soup["lm_head.weight"].tolist() == [[1.5, 1.5], [1.5, 1.5]]
    assert soup["embed.weight"].tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_average_special_values_and_empty() -> None:
    a = {"x": torch.tensor([math.inf, 1.0]), "e": torch.empty(0, 3), "b": torch.tensor([True])}
    b = {"x": torch.tensor([1.0, 3.0]), "e": torch.empty(0, 3), "b": torch.tensor([True])}
    out = cs.average([a, b])
    assert out["x"].tolist() == [math.inf, 2.0]
    assert out["e"].shape == (0, 3)
    assert out["b"].dtype == torch.bool


# --- files ----------------------------------------------------------------------------------


def test_merge_files_backbone_and_head_load_strictly(tmp_path: Path) -> None:
    import torchvision

    full = torchvision.models.resnet18(num_classes=10).state_dict()
    # A MoCo-like file: the backbone under module.encoder_q., nested in "state_dict".
    torch.save(
        {
            "epoch": 200,
            "state_dict": {
                "module.encoder_q." + k: v for k, v in full.items() if not k.startswith("fc.")
            },
        },
        tmp_path / "moco.pth.tar",
    )
    save_file({k: v for k, v in full.items() if k.startswith("fc.")}, tmp_path / "head.safetensors")
    out = tmp_path / "model.safetensors"
    result = cs.merge_files(
        [
            SourceSpec(
                tmp_path / "moco.pth.tar",
                rules=cs.Rules(strip_prefix=["module.encoder_q."]),
            ),
            tmp_path / "head.safetensors",
        ],
        out,
    )
    assert result.written is not None and result.written.tensors == len(full)
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(load_file(out), strict=True)
    assert_bit_exact(load_file(out), full, ordered=False)
    assert [s.taken for s in result.sources] == [len(full) - 2, 2]


def test_merge_files_conflicts(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"x": torch.tensor([1.0]), "y": torch.tensor([1])}, a)
    save_file({"x": torch.tensor([2.0]), "z": torch.tensor([2])}, b)
    with pytest.raises(MergeConflictError, match=r"in .*a\.safetensors and .*b\.safetensors: x"):
        cs.merge_files([a, b], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    for policy, want in (("first", 1.0), ("last", 2.0)):
        out = tmp_path / f"{policy}.safetensors"
        result = cs.merge_files([a, b], out, on_conflict=policy)
        got = load_file(out)
        assert sorted(got) == ["x", "y", "z"] and got["x"].item() == want
        assert [c.key for c in result.conflicts] == ["x"]
        assert result.conflicts[0].taken_from == (0 if policy == "first" else 1)


def test_merge_files_keeps_ties(tmp_path: Path) -> None:
    w = torch.randn(4, 2)
    torch.save({"embed.weight": w, "lm_head.weight": w, "x": torch.ones(1)}, tmp_path / "lm.pt")
    save_file({"norm.weight": torch.ones(2)}, tmp_path / "n.safetensors")
    for name in ("out.safetensors", "out.pt"):
        out = tmp_path / name
        cs.merge_files([tmp_path / "lm.pt", tmp_path / "n.safetensors"], out)
        sd = cs.load_state_dict(out)
        assert_tied(sd, "embed.weight", "lm_head.weight")
        assert raw(sd["lm_head.weight"]) == raw(w)
    header = safetensors_header(tmp_path / "out.safetensors")
    assert "lm_head.weight" not in header  # stored once
    aliases = json.loads(header["__metadata__"]["ckptsurgery.aliases"])
    assert aliases == {"lm_head.weight": "embed.weight"}


def test_merge_files_tie_survives_a_dropped_partner(tmp_path: Path) -> None:
    w = torch.randn(4, 2)
    torch.save({"a": w, "b": w, "c": w}, tmp_path / "t.pt")
    out = tmp_path / "o.safetensors"
    cs.merge_files([SourceSpec(tmp_path / "t.pt", rules=cs.Rules(drop=["a"]))], out)
    sd = cs.load_state_dict(out)
    assert list(sd) == ["b", "c"]
    assert_tied(sd, "b", "c")


def test_average_files_matches_in_memory(tmp_path: Path) -> None:
    sds = [net_state(i, torch.bfloat16, steps=i) for i in range(3)]
    paths = []
    for i, sd in enumerate(sds):
        paths.append(tmp_path / f"run{i}.safetensors")
        save_file(sd, paths[-1])
    with pytest.warns(UserWarning):
        want = cs.average(sds, weights=[0.2, 0.3, 0.5])
    for name in ("soup.safetensors", "soup.pt"):
        result = cs.average_files(paths, tmp_path / name, weights=[0.2, 0.3, 0.5])
        assert_bit_exact(cs.load_state_dict(tmp_path / name), want, ordered=False)
        assert result.copied == ("bn.num_batches_tracked",)
        assert any("bn.num_batches_tracked" in n for n in result.notes)


def test_average_files_refuses_before_writing(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"x": torch.zeros(3)}, tmp_path / "b.safetensors")
    with pytest.raises(MergeError, match=r"x has different shapes"):
        cs.average_files(
            [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "o.pt"
        )
    with pytest.raises(MergeError, match="at least two"):
        cs.average_files([tmp_path / "a.safetensors"], tmp_path / "o.pt")
    with pytest.raises(MergeError, match="1 weight for 2"):
        cs.average_files(
            [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "o.pt", weights=[1]
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_output_equal_to_an_input_is_refused(tmp_path: Path) -> None:
    a = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(2)}, a)
    with pytest.raises(cs.OutputError, match="is the input"):
        cs.merge_files([a], a, force=True)


def test_provenance_of_a_merge(tmp_path: Path) -> None:

    a, b = tmp_path / "a.safetensors", tmp_path / "b.pt"
    save_file({"enc.x": torch.zeros(2), "enc.y": torch.zeros(1)}, a)
    torch.save({"model": {"head.w": torch.ones(1)}}, b)
    out = tmp_path / "o.safetensors"
    rules = cs.Rules(strip_prefix=["enc."])
    cs.merge_files([SourceSpec(a, rules=rules), SourceSpec(b, key="model")], out)
    meta = safetensors_header(out)["__metadata__"]
    assert meta["ckptsurgery.version"] == cs.__version__
    sources = json.loads(meta["ckptsurgery.sources"])
    assert sources == [
        {
            "name": "a.safetensors",
            **source_digest(a),
            "key": None,
            "rules": {"strip_prefix": ["enc."]},
        },
        {"name": "b.pt", **source_digest(b), "key": "model"},
    ]
    assert json.loads(meta["ckptsurgery.merge"]) == {"mode": "union", "on_conflict": "error"}
    assert json.loads(meta["ckptsurgery.origin"]) == [
        {"source": 0, "name": "a.safetensors", "count": 2, "keys": ["{x, y}"]},
        {"source": 1, "name": "b.pt", "count": 1, "keys": ["head.w"]},
    ]


def test_provenance_of_an_average(tmp_path: Path) -> None:
    paths = [tmp_path / f"r{i}.safetensors" for i in range(2)]
    for i, p in enumerate(paths):
        save_file({"w": torch.full((2,), float(i)), "n": torch.tensor([3])}, p)
    out = tmp_path / "soup.safetensors"
    cs.average_files(paths, out, weights=[1, 3])
    meta = safetensors_header(out)["__metadata__"]
    assert json.loads(meta["ckptsurgery.merge"]) == {
        "mode": "average",
        "weights": [0.25, 0.75],
        "weights_given": [1, 3],
    }
    origin = json.loads(meta["ckptsurgery.origin"])
    assert origin[0] == {"source": "all", "how": "weighted mean", "count": 1, "keys": ["w"]}
    assert origin[1]["source"] == 0 and origin[1]["keys"] == ["n"]


def test_dry_run_reads_no_tensor_and_writes_nothing(tmp_path: Path, monkeypatch: Any) -> None:
    paths = [tmp_path / f"r{i}.safetensors" for i in range(2)]
    for i, p in enumerate(paths):
        save_file({"w": torch.full((2,), float(i))}, p)

    def boom(*_: Any) -> None:
        raise AssertionError("a dry run read tensor data")

    monkeypatch.setattr(PlanSource, "tensor", boom)
    monkeypatch.setattr(PlanSource, "raw_bytes", boom)
    monkeypatch.setattr(PlanSource, "write_data", boom)
    result = cs.average_files(paths, tmp_path / "o.safetensors", dry_run=True)
    assert result.written is None and result.names == ("w",)
    assert not (tmp_path / "o.safetensors").exists()


# --- streaming ------------------------------------------------------------------------------


def test_average_streams_one_tensor_at_a_time(tmp_path: Path, monkeypatch: Any) -> None:
    """Each output tensor is computed when the writer reaches it, from one fetch per source,
    and written before the next is computed; no source is ever materialised whole."""
    names = [f"layer{i}.weight" for i in range(6)]
    paths = []
    for r in range(3):
        paths.append(tmp_path / f"run{r}.safetensors")
        save_file({n: torch.full((64,), float(r + i)) for i, n in enumerate(names)}, paths[-1])

    log: list[tuple[str, str]] = []
    alive: list[int] = []
    original_mean = PlanSource.raw_bytes

    def counting_mean(self: PlanSource, name: str) -> bytes | memoryview:
        log.append(("compute", name))
        out = original_mean(self, name)
        alive.append(len(log))
        return out

    def no_state_dict(self: Any) -> None:
        raise AssertionError("a whole checkpoint was materialised")

    original_write = stf.write_file

    def logging_write(f: Any, items: Any, fetch: Any, metadata: Any, **kwargs: Any) -> int:
        def logged(name: str, *rest: Any) -> Any:
            data = fetch(name, *rest)
            log.append(("written", name))
            return data

        return original_write(f, items, logged, metadata, **kwargs)

    from ckptsurgery.io.safetensors_format import SafetensorsCheckpoint

    fetched: list[str] = []
    original_tensor = SafetensorsCheckpoint.bytes_view

    def counting_tensor(self: SafetensorsCheckpoint, name: str) -> bytes | memoryview:
        fetched.append(name)
        return original_tensor(self, name)

    monkeypatch.setattr(PlanSource, "raw_bytes", counting_mean)
    monkeypatch.setattr(cs.Checkpoint, "state_dict", no_state_dict)
    monkeypatch.setattr(stf, "write_file", logging_write)
    monkeypatch.setattr(SafetensorsCheckpoint, "bytes_view", counting_tensor)

    out = tmp_path / "soup.safetensors"
    cs.average_files(paths, out)
    # compute, write, compute, write ...: never two computed tensors waiting to be written
    assert log == [(what, n) for n in names for what in ("compute", "written")]
    # each source tensor fetched once, all three sources for a name before the next name
    assert fetched == [n for n in names for _ in range(3)]
    got = load_file(out)
    for i, n in enumerate(names):
        assert got[n].tolist() == [float(i + 1)] * 64
