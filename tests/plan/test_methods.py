"""Task arithmetic, TIES and DARE (ckptsurgery.plan.methods) against the reference written from
the definitions in tests/conftest.py, on random tensors; the library's calls; and what their
parameters and inputs may be."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DARE, method_reference_dict, raw
from safetensors.torch import load_file, save_file

import ckptsurgery as cs
from ckptsurgery.errors import MergeError
from ckptsurgery.merge import method_merge
from ckptsurgery.plan.methods import trim


def fine_tunes(
    shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype, n: int, seed: int = 0
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    base = {
        k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in shapes.items()
    }
    models = [
        {
            k: (v.double() + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(dtype)
            for k, v in base.items()
        }
        for _ in range(n)
    ]
    return base, models


SHAPES = {"w": (6, 5), "b": (7,), "conv": (2, 3, 3, 3), "one": (1,), "scalar": (), "empty": (0, 4)}
CASES = [
    ("task-arithmetic", {}),
    ("task-arithmetic", {"weights": [0.7, -0.4, 1.3], "lambda_": 0.6}),
    ("task-arithmetic", {"weights": [1.0, 2.0, 1.0], "normalize": True}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.2, "weights": [0.5, 1.0, 0.25], "lambda_": 1.5}),
    ("ties", {"density": 1.0, "normalize": False}),
    ("dare-linear", {"density": 0.5}),
    ("dare-linear", {"density": 0.3, "weights": [1.0, 0.5, 2.0], "seed": 7, "lambda_": 0.8}),
    ("dare-ties", {"density": 0.6, "seed": 3}),
    ("dare-ties", {"density": 0.4, "weights": [0.2, 0.3, 0.5], "normalize": True}),
]


TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(("method", "params"), CASES)
def test_methods_agree_with_the_reference(
    method: str, params: dict[str, Any], dtype: torch.dtype
) -> None:
    base, models = fine_tunes(SHAPES, dtype, 3)
    got = method_merge(base, models, method=method, **params)
    want = method_reference_dict(method, base, models, **params)
    assert list(got) == list(want)
    for k, w in want.items():
        assert got[k].dtype == dtype and got[k].shape == w.shape, k
        # Summation order differs (a running sum here, a stacked sum there): at most an ulp.
        tol = TOLERANCE.get(dtype, {})
        torch.testing.assert_close(got[k], w, **tol, msg=k)
    # The merge moved the weights: it is not the base, and (but for density 1) not the mean.
    assert not torch.equal(got["w"], base["w"])


def test_ties_trims_to_the_top_density_and_elects_signs() -> None:
    base = {"w": torch.zeros(6)}
    a = {"w": torch.tensor([3.0, -1.0, 0.5, 0.0, -4.0, 2.0])}
    b = {"w": torch.tensor([-1.0, -2.0, 1.5, 0.5, 3.0, 0.1])}
    # density 0.5 keeps 3 entries of each: a -> [3, 0, 0, 0, -4, 2], b -> [0, -2, 1.5, 0, 3, 0]
    # elected signs (sums 3, -2, 1.5, 0, -1, 2): +, -, +, +, -, +
    # disjoint mean: [3/1, -2/1, 1.5/1, 0 (none agree), -4/1 (b disagrees), 2/1]
    out = method_merge(base, [a, b], method="ties", density=0.5)
    assert out["w"].tolist() == [3.0, -2.0, 1.5, 0.0, -4.0, 2.0]
    # Weighted: the mean of the agreeing entries, by weight (2 * 3 + 1 * 1) / (2 + 1).
    out = method_merge(base, [a, {"w": torch.ones(6)}], method="ties", density=1.0, weights=[2, 1])
    assert out["w"][0].item() == pytest.approx(7 / 3)
    # Not normalised: the sum of the agreeing entries, scaled by lambda.
    out = method_merge(base, [a, a], method="ties", density=0.5, normalize=False, lambda_=0.5)
    assert out["w"].tolist() == [3.0, 0.0, 0.0, 0.0, -4.0, 2.0]


def test_trim_keeps_k_entries_lower_index_first_among_equal_magnitudes() -> None:
    t = torch.tensor([1.0, -2.0, 2.0, -1.0, 2.0, 0.5])
    assert trim(t.clone(), 0.5).tolist() == [0.0, -2.0, 2.0, 0.0, 2.0, 0.0]
    assert trim(t.clone(), 0.34).tolist() == [0.0, -2.0, 2.0, 0.0, 0.0, 0.0]
    # At least one entry survives where density * numel < 1 (mergekit would refuse).
    assert trim(t.clone(), 0.01).tolist() == [0.0, -2.0, 0.0, 0.0, 0.0, 0.0]
    assert trim(t.clone(), 1.0).tolist() == t.tolist()


def test_task_arithmetic_is_base_plus_lambda_times_weighted_task_vectors() -> None:
    base, models = fine_tunes({"w": (4, 3)}, torch.float64, 2)
    out = method_merge(base, models, method="task-arithmetic", weights=[0.5, -2.0], lambda_=0.3)
    d = [m["w"] - base["w"] for m in models]
    torch.testing.assert_close(out["w"], base["w"] + 0.3 * (0.5 * d[0] - 2.0 * d[1]))


@pytest.mark.parametrize("method", DARE)
def test_dare_is_reproducible_and_the_seed_matters(method: str) -> None:
    base, models = fine_tunes({"w": (40, 30), "b": (30,)}, torch.float32, 3)
    one = method_merge(base, models, method=method, density=0.5, seed=11)
    two = method_merge(base, models, method=method, density=0.5, seed=11)
    other = method_merge(base, models, method=method, density=0.5, seed=12)
    for k in one:
        assert raw(one[k]) == raw(two[k])
        assert raw(one[k]) != raw(other[k])
    # Each tensor draws from its own generator: merging it alone gives the same bits.
    alone = method_merge(
        {"b": base["b"]}, [{"b": m["b"]} for m in models], method=method, density=0.5, seed=11
    )
    assert raw(alone["b"]) == raw(one["b"])
    # About density of each task vector survives (the others drop to the base's value).
    kept = (one["w"] != base["w"]).float().mean().item()
    assert 0.4 < kept < 1.0


def test_dare_of_density_one_is_task_arithmetic() -> None:
    base, models = fine_tunes(SHAPES, torch.float32, 3)
    ta = method_merge(base, models, method="task-arithmetic", weights=[1, 0.5, 2], lambda_=0.7)
    dare = method_merge(
        base, models, method="dare-linear", density=1.0, weights=[1, 0.5, 2], lambda_=0.7
    )
    for k in ta:
        assert raw(ta[k]) == raw(dare[k]), k


def test_integer_tensors_are_the_bases_and_disagreements_are_told() -> None:
    base = {"w": torch.zeros(3), "n": torch.tensor(5)}
    models = [
        {"w": torch.ones(3), "n": torch.tensor(5)},
        {"w": torch.ones(3), "n": torch.tensor(9)},
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = method_merge(base, models, method="task-arithmetic")
    assert out["n"].item() == 5 and out["w"].tolist() == [2.0, 2.0, 2.0]
    assert any(
        "different values for 1 integer or bool tensor (n)" in str(w.message) for w in caught
    )


def test_mixed_dtypes_are_merged_wide_and_stored_as_the_base() -> None:
    base = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    models = [{"w": torch.tensor([1.5, 2.25], dtype=torch.float64)}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = method_merge(base, models, method="task-arithmetic", lambda_=2.0)
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [2.0, 2.5]
    assert any("merged in float64 and stored as bfloat16" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("ties", {}, "ties needs a density"),
        ("dare-linear", {"density": 0.0}, r"density 0.0 is not in \(0, 1\]"),
        ("dare-ties", {"density": 1.5}, r"density 1.5 is not in \(0, 1\]"),
        ("task-arithmetic", {"density": 0.5}, "density does not apply to task-arithmetic"),
        ("ties", {"density": 0.5, "seed": 1}, "seed applies to DARE's random drop only"),
        ("ties", {"density": 0.5, "weights": [1.0]}, "1 weight for 2 models"),
        ("task-arithmetic", {"lambda_": math.nan}, "lambda nan is not a finite number"),
        ("dare-ties", {"density": 0.5, "seed": -1}, "seed -1 is not a non-negative integer"),
        ("slerp", {}, "merge method 'slerp' is not one of"),
    ],
)
def test_bad_parameters_are_merge_errors(method: str, params: dict[str, Any], message: str) -> None:
    base, models = fine_tunes({"w": (3,)}, torch.float32, 2)
    with pytest.raises(MergeError, match=message):
        method_merge(base, models, method=method, **params)


def test_sources_that_do_not_line_up_are_refused() -> None:
    base = {"a": torch.zeros(3), "b": torch.zeros(2)}
    with pytest.raises(
        MergeError, match=r"cannot merge by ties.*1 key missing from state dict 2 \(b\)"
    ):
        method_merge(
            base,
            [{"a": torch.ones(3), "b": torch.ones(2)}, {"a": torch.ones(3)}],
            method="ties",
            density=0.5,
        )
    with pytest.raises(
        MergeError, match=r"a has different shapes \(base \[3\], state dict 1 \[4\]"
    ):
        method_merge(base, [{"a": torch.ones(4), "b": torch.ones(2)}], method="task-arithmetic")
    with pytest.raises(MergeError, match="complex tensors cannot be merged by ties"):
        z = {"z": torch.zeros(2, dtype=torch.complex64)}
        method_merge(z, [z], method="ties", density=0.5)
    with pytest.raises(MergeError, match="needs a base and at least one model"):
        method_merge(base, [], method="task-arithmetic")


def test_files_merged_by_the_library_match_the_in_memory_merge(tmp_path: Path) -> None:
    base, models = fine_tunes({"w": (8, 4), "b": (4,)}, torch.bfloat16, 2)
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i, m in enumerate(models):
        torch.save(m, tmp_path / f"m{i}.pt")
        paths.append(tmp_path / f"m{i}.pt")
    out = tmp_path / "out.safetensors"
    params = {"density": 0.5, "seed": 2, "weights": [0.5, 1.5]}
    planned = cs.method_merge_files(
        tmp_path / "base.safetensors", paths, out, method="dare-ties", dry_run=True, **params
    )
    assert not out.exists() and planned.mode == "method"
    assert planned.to_dict()["method"]["seed"] == 2
    result = cs.method_merge_files(
        tmp_path / "base.safetensors", paths, out, method="dare-ties", dtype="float32", **params
    )
    assert result.written is not None
    got = load_file(out)
    want = method_merge(base, models, method="dare-ties", **params)
    for k in want:
        assert got[k].dtype == torch.float32
        # float32 output of the same float32 arithmetic: rounding to bf16 gives the base's dtype
        assert raw(got[k].to(torch.bfloat16)) == raw(want[k]), k
