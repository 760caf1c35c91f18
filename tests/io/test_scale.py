"""Many tiny tensors: a state dict of 200,000 of them still works (inspect, remap, read back).

Nothing here is timed: speed belongs to the benchmark. Work that grew with the square of the
number of tensors would make this test run for hours, which shows in the suite's duration.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import cli_run

from ckptsurgery.io.dtypes import TensorInfo
from ckptsurgery.io.reader import open_checkpoint
from ckptsurgery.io.safetensors_format import encode_header

N = 200_000

pytestmark = pytest.mark.slow


def _names() -> list[str]:
    return [f"module.blocks.{i // 4}.{('w', 'b', 'g', 's')[i % 4]}" for i in range(N)]


def _safetensors(path: Path) -> Path:
    """Written without torch: one header, then each tensor's 8 bytes."""
    items = [(name, TensorInfo((2,), "float32", 8)) for name in _names()]
    header, _ = encode_header(items, {"format": "pt"})  # all float32: data in header order
    path.write_bytes(header + torch.arange(2 * N, dtype=torch.float32).numpy().tobytes())
    return path


def _torch_zip(path: Path) -> Path:
    values = torch.arange(2 * N, dtype=torch.float32).reshape(N, 2)
    # each tensor its own storage, as a model's state_dict() saves them
    torch.save({name: values[i].clone() for i, name in enumerate(_names())}, path)
    return path


def _ok(argv: list[str]) -> None:
    result = cli_run(*argv)
    assert result.exit_code == 0, result.stderr[-2000:]
    assert "Error:" not in result.stderr


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_200k_tiny_tensors(tmp_path: Path, fmt: str) -> None:
    if fmt == "safetensors":
        src = _safetensors(tmp_path / "many.safetensors")
    else:
        src = _torch_zip(tmp_path / "many.pt")
    out = tmp_path / f"out{src.suffix}"

    _ok(["inspect", str(src), "--json"])
    _ok(["remap", str(src), "-o", str(out), "--strip-prefix", "module."])

    # (torch.load itself needs half a minute for this file: read it back the fast way)
    with open_checkpoint(out) as ckpt:
        assert len(ckpt.infos) == N
        assert ckpt.tensor("blocks.49999.s").tolist() == [2 * (N - 1), 2 * (N - 1) + 1]
