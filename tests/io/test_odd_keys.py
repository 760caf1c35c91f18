"""Valid checkpoints whose keys are odd but legal pass through every command unchanged: the
empty string, unicode and emoji, 4096 characters, a path, a newline, NUL and quotes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_bit_exact, cli_run

import ckptsurgery as cs

ODD_KEYS = [
    "",
    "поле.вес",
    "emoji.\U0001f600.weight",
    "k" * 4096,
    "../../etc/passwd",
    "line\nbreak",
    "nul\x00byte",
    "quote'\"`",
    "module.fc.weight",
]


def _sd() -> dict[str, torch.Tensor]:
    return {k: torch.full((2,), float(i)) for i, k in enumerate(ODD_KEYS)}


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".pt":
        torch.save(sd, path)
    else:
        cs.save_state_dict(sd, path)
    return path


@pytest.mark.parametrize("src_ext", [".safetensors", ".pt"])
@pytest.mark.parametrize("out_ext", [".safetensors", ".pt"])
def test_odd_keys_round_trip_through_remap(tmp_path: Path, src_ext: str, out_ext: str) -> None:
    sd = _sd()
    src = _save(sd, tmp_path / f"src{src_ext}")
    plain = cli_run("remap", src, "-o", tmp_path / f"plain{out_ext}")
    assert plain.exit_code == 0, plain.stderr
    assert_bit_exact(cs.load_state_dict(tmp_path / f"plain{out_ext}"), sd)

    # a rule that touches another key leaves these alone
    renamed = cli_run(
        "remap", src, "-o", tmp_path / f"renamed{out_ext}", "--strip-prefix", "module."
    )
    assert renamed.exit_code == 0, renamed.stderr
    want = {("fc.weight" if k == "module.fc.weight" else k): v for k, v in sd.items()}
    assert_bit_exact(cs.load_state_dict(tmp_path / f"renamed{out_ext}"), want)


def test_odd_keys_in_inspect_and_merge(tmp_path: Path) -> None:
    src = _save(_sd(), tmp_path / "src.safetensors")
    shown = cli_run("inspect", src, "--json")
    assert shown.exit_code == 0, shown.stderr
    out = tmp_path / "union.safetensors"
    other = _save({"extra": torch.ones(1)}, tmp_path / "other.safetensors")
    merged = cli_run("merge", src, other, "-o", out)
    assert merged.exit_code == 0, merged.stderr
    assert set(cs.load_state_dict(out)) == {*ODD_KEYS, "extra"}


def test_a_rule_that_empties_a_name_is_still_an_error(tmp_path: Path) -> None:
    src = _save({"module.": torch.ones(1), "": torch.zeros(1)}, tmp_path / "src.safetensors")
    result = cli_run("remap", src, "-o", tmp_path / "out.safetensors", "--strip-prefix", "module.")
    assert result.exit_code == 2
    assert "rename 'module.' to an empty name" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()
