"""`ckptsurgery train` under a real `torchrun --standalone --nproc_per_node=2` on the CPU (gloo).

Each run is a subprocess in its own session, killed as a group on timeout, so that no worker
outlives the test; ``--standalone`` rendezvous on a free local port of its own.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import raw
from safetensors.torch import load_file, save_file
from test_train_support import make_images, run_in_session, write_tiny_nets

from ckptsurgery.models import build_model
from ckptsurgery.train import TransformConfig, evaluate
from ckptsurgery.train.data import image_folder
from ckptsurgery.train.distributed import Dist, shard_indices

pytestmark = pytest.mark.slow

BASE = ["--model", "tinynets:TinyCNN", "--data", "data", "--image-size", "16"]
TIMEOUT = 240


def torchrun(folder: Path, *args: str) -> tuple[int, str, str]:
    """``torchrun --standalone --nproc_per_node=2 -m ckptsurgery ARGS`` in ``folder``."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    argv += ["--nproc_per_node=2", "-m", "ckptsurgery", *args]
    proc = run_in_session(argv, cwd=folder, timeout=TIMEOUT, env=env)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_tiny_nets(tmp_path)
    monkeypatch.chdir(tmp_path)  # for tinynets:TinyCNN in this process too
    # 15 evaluation images: rank 0 gets 8, rank 1 gets 7; a padded sampler would count 16.
    make_images(tmp_path / "data", per_class={"train": 6, "val": 5})
    return tmp_path


def test_shards_cover_every_sample_once() -> None:
    shards = [list(shard_indices(15, Dist(rank=r, world=2))) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(15))
    assert len(shards[0]) == 8 and len(shards[1]) == 7


def test_two_processes_train_evaluate_exactly_and_save_once(folder: Path) -> None:
    code, out, err = torchrun(
        folder,
        "train", *BASE, "-o", "run", "--mode", "discriminative", "--epochs", "3",
        "--batch-size", "4", "--lr", "0.05", "--device", "cpu", "--json",
    )  # fmt: skip
    assert code == 0, err[-4000:]
    result = json.loads(out)  # rank 0 printed one JSON object; rank 1 printed nothing
    assert result["world_size"] == 2
    assert "2 processes (gloo), global batch 8" in err
    assert err.count("head: fc (Linear") == 1  # only rank 0 logs
    # Exact evaluation: every validation image counted once, none padded.
    assert [m["samples"] for m in result["metrics"]] == [15, 15, 15]
    run = folder / "run"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3  # written once

    # The saved weights: no "module." prefix, strict load into a fresh model...
    best = load_file(str(run / "best.safetensors"))
    assert not any(k.startswith("module.") for k in best)
    fresh = build_model("tinynets:TinyCNN", {"num_classes": 3}, device="cpu").module
    fresh.load_state_dict(best, strict=True)
    # ... and they are what was evaluated: one process over the whole split agrees exactly.
    single = evaluate(
        "tinynets:TinyCNN",
        run / "best.safetensors",
        folder / "data",
        transform=TransformConfig(image_size=16),
        device="cpu",
    ).metrics
    assert single.samples == 15 == len(image_folder(folder / "data" / "val", None))
    assert single.top1 == result["best"]["top1"]
    assert single.loss == pytest.approx(result["best"]["val_loss"], rel=1e-5)
    state = torch.load(run / "last_state.pt", weights_only=True)
    assert state["world_size"] == 2 and not any(k.startswith("module.") for k in state["model"])


def test_linear_probe_under_torchrun_keeps_the_backbone_bit_identical(folder: Path) -> None:
    torch.manual_seed(3)
    model = build_model("tinynets:TinyCNN", {"num_classes": 10}, device="cpu").module
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():  # non-default BN statistics, as after pretraining
                t.copy_(torch.rand_like(t) * 0.2 + (0.9 if "running_var" in name else 0.0))
    weights: dict[str, Any] = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(folder / "pretrained.safetensors"))

    code, _, err = torchrun(
        folder,
        "train", *BASE, "-o", "probe", "--mode", "linear-probe", "--epochs", "2",
        "--batch-size", "4", "--lr", "0.5", "--device", "cpu",
        "--weights", "pretrained.safetensors",
    )  # fmt: skip
    assert code == 0, err[-4000:]
    assert "frozen tensors are bit-identical" in err
    last = load_file(str(folder / "probe" / "last.safetensors"))
    for key, value in weights.items():
        if not key.startswith("fc."):
            assert raw(last[key]) == raw(value), key
    assert last["fc.weight"].shape == (3, 8)


def test_the_recipe_under_torchrun_keeps_averages_and_saves_once(folder: Path) -> None:
    # Accumulation skips the all-reduce on its first batch (no_sync); every rank ranks the
    # epochs for --keep-top-k, so that all of them reach the averaging together.
    code, out, err = torchrun(
        folder,
        "train", *BASE, "-o", "run", "--mode", "full", "--epochs", "2", "--batch-size", "2",
        "--accum-steps", "2", "--ema", "0.9", "--mixup", "0.4", "--clip-grad", "1",
        "--keep-top-k", "2", "--average-top-k", "--device", "cpu", "--json",
    )  # fmt: skip
    assert code == 0, err[-4000:]
    result = json.loads(out)
    assert sorted(result["averaged"]["epochs"]) == [1, 2]
    assert all(m["ema"]["top1"] is not None for m in result["metrics"])
    run = folder / "run"
    assert len(list((run / "top_k").iterdir())) == 2
    single = evaluate(
        "tinynets:TinyCNN",
        run / "ema.safetensors",
        folder / "data",
        transform=TransformConfig(image_size=16),
        device="cpu",
    ).metrics
    assert single.top1 == result["metrics"][-1]["ema"]["top1"]  # the EMA as evaluated
    state = torch.load(run / "last_state.pt", weights_only=True)
    assert state["ema_updates"] == 2 * 3  # 9 images per rank, batches of 2: 5 batches, 3 steps
