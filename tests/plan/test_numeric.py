"""Weighted sums with numpy from stored bytes (no torch): bit for bit torch's, for every
float dtype a checkpoint holds, special values included; and merge --average of safetensors
files never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptsurgery.plan import numeric
from ckptsurgery.plan.ops import accumulator, weighted_sum

_SPECIAL = [float("nan"), float("inf"), -float("inf"), 3.0e38, -0.0, 1e-40, 65504.0, 1e-8]


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize(
    ("dtypes", "out"),
    [
        (["float32"] * 3, "float32"),
        (["bfloat16"] * 3, "bfloat16"),
        (["float16"] * 2, "float16"),
        (["float32", "bfloat16", "float16"], "bfloat16"),
        (["float32", "float32"], "float16"),
        (["float16", "float16"], "float32"),
        (["float64", "float32"], "float32"),
        (["bfloat16", "float64"], "bfloat16"),
        (["float64", "float64"], "float16"),
        (["float64", "float64", "float64"], "float64"),
        (["float32"], "bfloat16"),
    ],
)
@pytest.mark.parametrize("numel", [0, 1, 7, numeric.BLOCK + 3])
def test_equals_torch_bit_for_bit(dtypes: list[str], out: str, numel: int) -> None:
    g = torch.Generator().manual_seed(numel + len(dtypes))
    tensors = [(torch.randn(numel, generator=g) * 300).to(getattr(torch, d)) for d in dtypes]
    if numel >= len(_SPECIAL):
        tensors[0][: len(_SPECIAL)] = torch.tensor(_SPECIAL).to(tensors[0].dtype)
        tensors[-1][-len(_SPECIAL) :] = torch.tensor(_SPECIAL).to(tensors[-1].dtype)
    weights = list(torch.rand(len(dtypes), generator=g).tolist())
    weights = [w / sum(weights) for w in weights]
    acc = accumulator(dtypes)
    want = weighted_sum(iter(tensors), weights, accumulate=acc, dtype=out)
    got = numeric.weighted_sum_bytes(
        [lambda t=t: _bytes(t) for t in tensors],
        dtypes,
        weights,
        accumulate=acc,
        dtype=out,
        numel=numel,
    )
    assert bytes(got) == _bytes(want)


def test_the_sum_is_rounded_product_by_product() -> None:
    """The definition, spelled out: float32 products, added in order (not fused)."""
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(1000).astype(np.float32) for _ in range(3)]
    w = [0.2, 0.3, 0.5]
    want = xs[0] * np.float32(w[0])
    for x, wi in zip(xs[1:], w[1:], strict=True):
        want = want + x * np.float32(wi)
    got = numeric.weighted_sum_bytes(
        [lambda x=x: x.tobytes() for x in xs],
        ["float32"] * 3,
        w,
        accumulate="float32",
        dtype="float32",
        numel=1000,
    )
    assert np.array_equal(np.frombuffer(got, np.float32), want)


def test_inputs_are_never_written(tmp_path: Path) -> None:
    data = [bytearray(np.arange(10, dtype=np.float32).tobytes()) for _ in range(2)]
    before = [bytes(d) for d in data]
    numeric.weighted_sum_bytes(
        [lambda d=d: d for d in data],
        ["float32"] * 2,
        [0.5, 0.5],
        accumulate="float32",
        dtype="float32",
        numel=10,
    )
    assert [bytes(d) for d in data] == before


def test_summable() -> None:
    assert numeric.summable(["float32", "bfloat16"], "float16")
    assert not numeric.summable(["complex64"], "complex64")
    assert not numeric.summable(["float32"], "int64")
    assert not numeric.summable(["float8_e4m3fn"], "float8_e4m3fn")


def test_average_of_safetensors_never_imports_torch(tmp_path: Path) -> None:
    """merge --average of safetensors files (big tensors mapped, small ones read, bf16 and
    float32, a --dtype cast of the mean) runs without torch, and writes torch's mean."""
    paths = []
    g = torch.Generator().manual_seed(0)
    for r in range(3):
        sd = {
            "big": torch.randn(600, 600, generator=g),  # > 1 MiB: mapped
            "half": torch.randn(33, generator=g).to(torch.bfloat16),
            "steps": torch.tensor([r]),
        }
        paths.append(tmp_path / f"run{r}.safetensors")
        save_file(sd, paths[-1])
    out = tmp_path / "soup.safetensors"
    argv = ["ckptsurgery", "merge", *map(str, paths), "-o", str(out), "--average"]
    argv += ["--weights", "1,2,3", "--dtype", "float16"]
    code = (
        "import sys\n"
        "from ckptsurgery.cli import main\n"
        f"sys.argv = {argv!r}\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "False"
    got = load_file(out)
    inputs = [load_file(p) for p in paths]
    w = [1 / 6, 2 / 6, 3 / 6]
    for key in ("big", "half"):
        want = weighted_sum((i[key] for i in inputs), w, accumulate="float32", dtype="float16")
        assert torch.equal(got[key], want)
    assert got["steps"].tolist() == [0]


def test_big_copies_are_added_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inputs copied in memory beyond HOLD go to a whole accumulator, one at a time (each let
    go before the next is fetched); the sum is bit for bit the same."""
    import gc
    import weakref

    monkeypatch.setattr(numeric, "HOLD", 1000)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(numeric.BLOCK + 5).astype(np.float32) for _ in range(4)]
    alive: list[weakref.ref[np.ndarray]] = []

    def fetch(i: int) -> memoryview:
        gc.collect()
        held = sum(1 for r in alive if r() is not None)
        assert held <= 1, f"{held} earlier inputs still held when input {i} is fetched"
        copy = xs[i].copy()
        alive.append(weakref.ref(copy))
        return memoryview(copy).cast("B")

    w = [0.1, 0.2, 0.3, 0.4]
    got = numeric.weighted_sum_bytes(
        [lambda i=i: fetch(i) for i in range(4)],
        ["float32"] * 4,
        w,
        accumulate="float32",
        dtype="bfloat16",
        numel=len(xs[0]),
    )
    want = weighted_sum(
        (torch.from_numpy(x) for x in xs), w, accumulate="float32", dtype="bfloat16"
    )
    assert bytes(got) == _bytes(want)
