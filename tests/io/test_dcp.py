"""torch.distributed.checkpoint folders as sources: metadata without data, tensors bit-exact."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_bit_exact, raw

import ckptsurgery as cs
from ckptsurgery.errors import FormatError, SourceError
from ckptsurgery.io.dcp import DcpCheckpoint

# A real 2-process job: DTensors sharded along dim 0 (FSDP's layout) and dim 1, a replicated
# DTensor, a plain tensor (saved once, by rank 0), and a non-tensor entry.
_JOB = """
import sys, torch, torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
g = torch.Generator().manual_seed(0)
full = {
    "embed.weight": torch.randn(10, 4, generator=g),
    "layer.weight": torch.randn(5, 6, generator=g).to(torch.bfloat16),
    "layer.bias": torch.randn(7, generator=g),
    "norm.weight": torch.randn(3, 4, generator=g).to(torch.float16),
    "counter": torch.arange(9, dtype=torch.int64),
    "scalar": torch.tensor(2.5, dtype=torch.float64),
}
model = {
    "embed.weight": distribute_tensor(full["embed.weight"], mesh, [Shard(0)]),
    "layer.weight": distribute_tensor(full["layer.weight"], mesh, [Shard(1)]),
    "layer.bias": distribute_tensor(full["layer.bias"], mesh, [Shard(0)]),
    "norm.weight": distribute_tensor(full["norm.weight"], mesh, [Replicate()]),
    "counter": full["counter"],
    "scalar": full["scalar"],
}
dcp.save({"model": model, "step": 42}, checkpoint_id=sys.argv[1])
if dist.get_rank() == 0:
    torch.save(full, sys.argv[2])
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def dcp_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    work = tmp_path_factory.mktemp("dcp")
    script = work / "job.py"
    script.write_text(_JOB)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(work / "ckpt"),
         str(work / "full.pt")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = torch.load(work / "full.pt", weights_only=True)
    return work / "ckpt", full


@pytest.mark.slow
def test_torchrun_checkpoint_converts_bit_exact(
    dcp_job: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    folder, full = dcp_job
    assert sorted(p.name for p in folder.iterdir())[0] == ".metadata"
    with cs.open_checkpoint(folder) as ckpt:
        assert isinstance(ckpt, DcpCheckpoint) and ckpt.format == "dcp"
        assert ckpt.key == "model" and ckpt.other_entries == {"step": "int"}
        assert {n: (i.shape, i.dtype) for n, i in ckpt.infos.items()} == {
            n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in full.items()
        }
        got = ckpt.state_dict()
    assert_bit_exact(got, full, ordered=False)
    for ext in ("safetensors", "pt"):
        out = tmp_path / f"out.{ext}"
        cs.remap(folder, out, cs.Rules(add_prefix="m."))
        assert_bit_exact(
            cs.load_state_dict(out), {f"m.{n}": t for n, t in full.items()}, ordered=False
        )
    plain = torch.load(tmp_path / "out.pt", weights_only=True)
    assert raw(plain["m.embed.weight"]) == raw(full["embed.weight"])


@pytest.mark.slow
def test_torchrun_checkpoint_converts_without_torch(
    dcp_job: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    folder, full = dcp_job
    script = textwrap.dedent(
        f"""
        import sys
        from ckptsurgery.cli import main
        sys.argv = ["ckptsurgery", "remap", {str(folder)!r}, "-o", "out.safetensors",
                    "--key", "model", "--max-shard-size", "200"]
        try:
            main()
        except SystemExit as e:
            assert e.code in (0, None), e.code
        assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
        print("TORCH-FREE")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert "TORCH-FREE" in proc.stdout, proc.stderr
    assert_bit_exact(cs.load_state_dict(tmp_path / "out.safetensors"), full, ordered=False)


# --- single-process checkpoints (no torchrun needed) ---------------------------------------


def _save_dcp(folder: Path, state: dict[str, Any]) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving as a single process"
        dcp.save(state, checkpoint_id=str(folder))
    return folder


def _single(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = {
        "w": torch.randn(4, 3),
        "b": torch.arange(5, dtype=torch.int64),
        "h": torch.ones(2).half(),
    }
    return _save_dcp(tmp_path / "ck", {"model": sd, "step": 3, "opt": {"lr": 0.1}}), sd


def test_single_process_dcp(tmp_path: Path) -> None:
    folder, sd = _single(tmp_path)
    with cs.open_checkpoint(folder, key="model") as ckpt:
        assert ckpt.other_entries == {"step": "int", "opt": "dict"}
        assert_bit_exact(ckpt.state_dict(), sd, ordered=False)
    with pytest.raises(cs.StateDictSelectionError, match="no entry 'modle'"):
        cs.open_checkpoint(folder, key="modle")


def test_flat_dcp_is_the_state_dict(tmp_path: Path) -> None:
    sd = {"a.weight": torch.randn(2, 2), "a.bias": torch.zeros(2)}
    folder = _save_dcp(tmp_path / "flat", sd)
    with cs.open_checkpoint(folder) as ckpt:
        assert ckpt.key is None
        assert_bit_exact(ckpt.state_dict(), sd, ordered=False)


def _metadata(folder: Path) -> Any:
    with open(folder / ".metadata", "rb") as f:
        return pickle.load(f)  # the test's own trusted file


def _rewrite_metadata(folder: Path, change: Any) -> None:
    meta = _metadata(folder)
    change(meta)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(meta, f)


class _Touch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_code_in_the_metadata_never_runs(tmp_path: Path) -> None:
    folder, _ = _single(tmp_path)
    marker = tmp_path / "MARKER"
    _rewrite_metadata(folder, lambda m: setattr(m, "planner_data", _Touch(marker)))
    with pytest.raises(FormatError, match=r"refusing to unpickle .*in DCP metadata"):
        cs.open_checkpoint(folder)
    assert not marker.exists()


@pytest.mark.parametrize("cut", [0, 10, 200])
def test_truncated_metadata(tmp_path: Path, cut: int) -> None:
    folder, _ = _single(tmp_path)
    data = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(data[:cut])
    with pytest.raises(FormatError, match="truncated or malformed DCP metadata"):
        cs.open_checkpoint(folder)


def test_data_file_outside_the_folder_is_refused(tmp_path: Path) -> None:
    folder, _ = _single(tmp_path)
    shutil.copy(folder / "__0_0.distcp", tmp_path / "elsewhere.distcp")

    def escape(meta: Any) -> None:
        for info in meta.storage_data.values():
            info.relative_path = "../elsewhere.distcp"

    _rewrite_metadata(folder, escape)
    with pytest.raises(FormatError, match="not a file of the folder"):
        cs.open_checkpoint(folder)


def test_missing_data_file(tmp_path: Path) -> None:
    folder, _ = _single(tmp_path)
    (folder / "__0_0.distcp").unlink()
    with cs.open_checkpoint(folder, key="model") as ckpt:  # metadata alone: no data read
        assert set(ckpt.infos) == {"w", "b", "h"}
        with pytest.raises(SourceError, match=r"data file '__0_0\.distcp' is missing"):
            ckpt.raw_bytes("w")


def test_chunks_that_do_not_tile_the_tensor(tmp_path: Path) -> None:
    folder, _ = _single(tmp_path)

    def grow(meta: Any) -> None:
        meta.state_dict_metadata["model.w"].size = torch.Size([5, 3])

    _rewrite_metadata(folder, grow)
    with pytest.raises(FormatError, match=r"'model.w': its chunks hold 12 elements"):
        cs.open_checkpoint(folder)


def test_chunk_of_the_wrong_dtype(tmp_path: Path) -> None:
    folder, _ = _single(tmp_path)

    def lie(meta: Any) -> None:
        meta.state_dict_metadata["model.w"].properties.dtype = torch.int32

    _rewrite_metadata(folder, lie)
    with (
        cs.open_checkpoint(folder, key="model") as ckpt,
        pytest.raises(FormatError, match=r"a chunk holds float32\[4, 3\], the metadata says int32"),
    ):
        ckpt.raw_bytes("w")
