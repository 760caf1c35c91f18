"""Finding the state dict a user means inside a training checkpoint (and ``--key``)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import assert_bit_exact

import ckptsurgery as cs
from ckptsurgery.errors import StateDictSelectionError
from ckptsurgery.state_dict import find_candidates, is_state_dict, select_state_dict


def _sd(prefix: str = "", n: int = 2) -> dict[str, torch.Tensor]:
    return {f"{prefix}layer{i}.weight": torch.full((2,), float(i)) for i in range(n)}


def _save(tmp_path: Path, obj: object, name: str = "ckpt.pth.tar") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_flat_state_dict(tmp_path: Path) -> None:
    sd = _sd()
    with cs.open_checkpoint(_save(tmp_path, sd)) as ckpt:
        assert ckpt.key is None
        assert ckpt.other_entries == {}
        assert_bit_exact(ckpt.state_dict(), sd)


def test_model_state_dict_ordered_dict(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    path = _save(tmp_path, model.state_dict())
    assert_bit_exact(cs.load_state_dict(path), model.state_dict())


def _optimizer_state() -> dict[str, object]:
    """An SGD-with-momentum ``optimizer.state_dict()``, built by hand (torch.optim is slow to
    import): integer parameter ids map to dicts of tensors."""
    return {
        "state": {0: {"momentum_buffer": torch.ones(2)}, 1: {"momentum_buffer": torch.ones(2)}},
        "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1]}],
    }


def test_moco_style_selects_state_dict_and_reports_the_rest(tmp_path: Path) -> None:
    sd = _sd("module.encoder_q.")
    ckpt = {"epoch": 200, "arch": "resnet50", "state_dict": sd, "optimizer": _optimizer_state()}
    with cs.open_checkpoint(_save(tmp_path, ckpt)) as c:
        assert c.key == "state_dict"
        assert c.other_entries == {"epoch": "int", "arch": "str", "optimizer": "dict"}
        assert_bit_exact(c.state_dict(), sd)


def test_optimizer_with_tensor_state_is_not_a_candidate(tmp_path: Path) -> None:
    ckpt = {"model": _sd(), "optimizer": _optimizer_state()}
    assert cs.open_checkpoint(_save(tmp_path, ckpt)).key == "model"
    # Even when the optimizer's entry holds a one-parameter state of str -> tensor.
    ckpt = {"model": _sd(), "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}}}
    assert cs.open_checkpoint(_save(tmp_path, ckpt)).key == "model"


def test_dino_style_is_ambiguous(tmp_path: Path) -> None:
    ckpt = {"student": _sd(), "teacher": _sd(), "epoch": 100}
    with pytest.raises(
        StateDictSelectionError,
        match=r"several state dicts found \(student, teacher\); choose one with --key",
    ) as e:
        cs.load_state_dict(_save(tmp_path, ckpt))
    assert e.value.candidates == ("student", "teacher")
    assert_bit_exact(cs.load_state_dict(_save(tmp_path, ckpt), key="teacher"), _sd())


def test_state_dict_and_its_ema_are_ambiguous(tmp_path: Path) -> None:
    ckpt = {"state_dict": _sd(), "state_dict_ema": _sd(), "epoch": 3}
    with pytest.raises(StateDictSelectionError, match="state_dict, state_dict_ema") as e:
        cs.load_state_dict(_save(tmp_path, ckpt))
    assert e.value.candidates == ("state_dict", "state_dict_ema")


def test_nested_two_levels(tmp_path: Path) -> None:
    sd = _sd("blocks.")
    ckpt = {"model": {"ema": sd, "decay": 0.999}, "step": 10}
    with cs.open_checkpoint(_save(tmp_path, ckpt)) as c:
        assert c.key == "model/ema"
        assert c.other_entries == {"step": "int"}
        assert_bit_exact(c.state_dict(), sd)


def test_nested_two_levels_ambiguous(tmp_path: Path) -> None:
    ckpt = {"model": {"student": _sd(), "teacher": _sd()}}
    with pytest.raises(StateDictSelectionError, match=r"\(model/student, model/teacher\)"):
        cs.load_state_dict(_save(tmp_path, ckpt))


def test_key_path(tmp_path: Path) -> None:
    a, b = _sd("a."), _sd("b.", 3)
    path = _save(tmp_path, {"a": {"b": b, "c": a}, "x": a})
    with cs.open_checkpoint(path, key="a/b") as c:
        assert c.key == "a/b"
        assert c.other_entries == {"x": "dict"}
        assert_bit_exact(c.state_dict(), b)
    assert_bit_exact(cs.load_state_dict(path, key="/a/c/"), a)
    assert_bit_exact(cs.load_state_dict(path, key="x"), a)


def test_key_selects_a_flat_file_whole_when_asked_for_nothing(tmp_path: Path) -> None:
    path = _save(tmp_path, _sd())
    with pytest.raises(StateDictSelectionError, match=r"no entry 'state_dict' at the top level"):
        cs.load_state_dict(path, key="state_dict")


def test_key_that_does_not_exist_lists_entries(tmp_path: Path) -> None:
    path = _save(tmp_path, {"model": {"ema": _sd(), "online": _sd()}, "epoch": 1})
    with pytest.raises(
        StateDictSelectionError,
        match=r"--key 'modle': no entry 'modle' at the top level; it has 'model', 'epoch'",
    ):
        cs.load_state_dict(path, key="modle")
    with pytest.raises(
        StateDictSelectionError, match=r"no entry 'emma' at model; it has 'ema', 'online'"
    ):
        cs.load_state_dict(path, key="model/emma")


def test_key_through_a_non_mapping(tmp_path: Path) -> None:
    path = _save(tmp_path, {"epoch": 1, "state_dict": _sd()})
    with pytest.raises(StateDictSelectionError, match=r"epoch is a int, not a mapping"):
        cs.load_state_dict(path, key="epoch/x")


def test_key_to_something_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = _save(tmp_path, {"meta": {"lr": 0.1, "w": torch.ones(1)}, "state_dict": _sd()})
    with pytest.raises(
        StateDictSelectionError,
        match=r"--key 'meta' is a dict, not a state dict.*entry 'lr' is a float",
    ):
        cs.load_state_dict(path, key="meta")


def test_integer_keys_are_not_a_state_dict(tmp_path: Path) -> None:
    obj = {0: torch.ones(2), 1: torch.zeros(2)}
    assert not is_state_dict(obj)
    with pytest.raises(
        StateDictSelectionError, match=r"no state dict found .*entries '0', '1'.*--key"
    ):
        cs.load_state_dict(_save(tmp_path, obj))
    with pytest.raises(StateDictSelectionError, match=r"key 0 is a int, not a str"):
        cs.load_state_dict(_save(tmp_path, {"m": obj}), key="m")


def test_no_state_dict_in_a_list(tmp_path: Path) -> None:
    with pytest.raises(StateDictSelectionError, match=r"no state dict found .*it holds a list"):
        cs.load_state_dict(_save(tmp_path, [torch.ones(1)]))


def test_a_mapping_with_a_non_tensor_is_not_a_state_dict() -> None:
    assert is_state_dict(OrderedDict(w=torch.ones(1)))
    assert not is_state_dict({})
    assert not is_state_dict({"w": torch.ones(1), "n": 3})
    assert find_candidates({"a": {}, "b": {"w": torch.ones(1)}, 3: {"w": torch.ones(1)}}) == ["b"]


def test_selection_leaves_the_object_alone() -> None:
    root = {"state_dict": _sd(), "epoch": 1}
    sel = select_state_dict(root, None, source="x")
    assert sel.key == "state_dict" and sel.state_dict is root["state_dict"]
    assert list(root) == ["state_dict", "epoch"]


def test_key_on_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    cs.save_state_dict(_sd(), path)
    with pytest.raises(StateDictSelectionError, match=r"safetensors file.*--key does not apply"):
        cs.load_state_dict(path, key="state_dict")
    with pytest.raises(StateDictSelectionError, match="--key does not apply"):
        cs.remap(path, tmp_path / "out.safetensors", cs.Rules(), key="model")
    assert not (tmp_path / "out.safetensors").exists()


def test_remap_with_key(tmp_path: Path) -> None:
    sd = _sd("module.")
    path = _save(tmp_path, {"epoch": 1, "model": {"ema": sd}})
    out = tmp_path / "out.safetensors"
    result = cs.remap(path, out, cs.Rules(strip_prefix=["module."]), key="model/ema")
    assert result.written is not None
    assert_bit_exact(cs.load_state_dict(out), _sd())


def test_empty_checkpoint_is_an_empty_state_dict(tmp_path: Path) -> None:
    assert cs.load_state_dict(_save(tmp_path, {})) == {}
    empty = tmp_path / "empty.safetensors"
    cs.save_state_dict({}, empty)
    assert cs.load_state_dict(empty) == {}
    with pytest.raises(StateDictSelectionError, match="no state dict found"):
        cs.load_state_dict(_save(tmp_path, {"optimizer": {"state": {}}}))


@pytest.mark.parametrize(
    "obj",
    [
        {"model/ema": _sd(), "epoch": 3},
        {"run/1": {"teacher": _sd(), "config": "x"}, "epoch": 3},
    ],
    ids=["top-level", "nested"],
)
def test_a_key_holding_a_slash_is_found(tmp_path: Path, obj: dict[str, object]) -> None:
    """The one candidate was fetched by splitting its path at "/": a key with a slash in it
    ({"model/ema": ...}) raised KeyError instead of being selected (found by fuzzing)."""
    path = _save(tmp_path, obj)
    with cs.open_checkpoint(path) as ckpt:
        assert sorted(ckpt.infos) == sorted(_sd())
        assert ckpt.other_entries == {"epoch": "int"}
    selected = select_state_dict(torch.load(path, weights_only=True), None, source="x")
    assert sorted(selected.state_dict) == sorted(_sd())
