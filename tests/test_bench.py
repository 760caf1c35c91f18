"""The benchmark script runs end to end (at a tiny size) and its outputs agree."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _bench(tmp_path: Path, *args: str) -> list[dict[str, object]]:
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args, "--size", "0.001", "--runs", "1", "--json",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows: list[dict[str, object]] = json.loads(proc.stdout)
    return rows


def test_bench_runs_and_compares_with_cp(tmp_path: Path) -> None:
    rows = _bench(tmp_path, "strip-pt", "inspect-st")
    by = {(r["task"], r["approach"]): r for r in rows}
    assert by["strip-pt", "cp + fsync (baseline)"]["time_ratio"] == 1.0
    surgery = by["strip-pt", "ckptsurgery remap"]
    naive = by["strip-pt", "naive torch.load + torch.save"]
    assert surgery["peak_rss_mb"] < naive["peak_rss_mb"]  # type: ignore[operator]
    assert ("inspect-st", "ckptsurgery inspect") in by
    # the default path's stages, from one more run with --json
    stages = {"copy", "fsync", "wait", "verify", "read_back"}
    assert set(surgery["breakdown"]) == stages  # type: ignore[arg-type]
    assert "breakdown" not in by["strip-pt", "ckptsurgery remap --no-verify"]
    # the inputs were generated deterministically and kept in the work folder; outputs gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.safetensors"]


def test_bench_pairs_a_base_version_and_leaves_out_what_it_cannot_run(tmp_path: Path) -> None:
    """--base-src runs ckptsurgery's approaches again from another source tree (here this one,
    copied); a task the base cannot run (it lacks a flag) loses only the base rows."""
    import shutil

    base = tmp_path / "base" / "src"
    shutil.copytree(BENCH.parents[1] / "src", base, ignore=shutil.ignore_patterns("__pycache__"))
    plan_cli = base / "ckptsurgery" / "cli" / "_options.py"
    text = plan_cli.read_text().replace('"--dtype",', '"--dtype-renamed",\n        "dtype",')
    assert "--dtype-renamed" in text
    plan_cli.write_text(text)  # as a version from before --dtype
    work = tmp_path / "work"
    rows = _bench(work, "keep-half", "cast-bf16", "--base-src", str(base))
    names = {(r["task"], r["approach"]) for r in rows}
    assert ("keep-half", "ckptsurgery remap --keep (base)") in names
    assert ("keep-half", "ckptsurgery remap --keep --no-verify (base)") in names
    assert ("cast-bf16", "ckptsurgery remap --dtype bfloat16") in names
    assert not any(t == "cast-bf16" and a.endswith("(base)") for t, a in names)


@pytest.mark.slow
@pytest.mark.skipif(
    "CKPTSURGERY_BENCH_ALL" not in os.environ,
    reason="a minute of torch imports; set CKPTSURGERY_BENCH_ALL=1 to run every task",
)
def test_bench_every_task(tmp_path: Path) -> None:
    rows = _bench(tmp_path)
    tasks = {r["task"] for r in rows}
    assert {"strip-st", "strip-pt", "pt-to-st", "keep-half", "cast-bf16", "inspect-st",
            "inspect-pt", "diff", "values"} <= tasks  # fmt: skip
    for r in rows:
        assert r["wall_s"] >= 0 and r["peak_rss_mb"] > 0  # type: ignore[operator]


def test_goal_rows_compare_with_the_baseline_and_no_verify() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    rows = [
        {"task": "strip-st", "approach": "cp + fsync (baseline)", "wall_s": 2.0},
        {"task": "strip-st", "approach": "ckptsurgery remap", "wall_s": 2.2},
        {"task": "strip-st", "approach": "ckptsurgery remap --no-verify", "wall_s": 2.0},
        {"task": "average", "approach": "naive load_file x3 + mean + save_file (baseline)",
         "wall_s": 10.0},
        {"task": "average", "approach": "ckptsurgery merge --average", "wall_s": 6.0},
    ]  # fmt: skip
    assert bench.goal_rows(rows) == [
        ["strip-st", "ckptsurgery remap", "baseline", 1.1, "<= 1.15", "yes"],
        ["average", "ckptsurgery merge --average", "baseline", 0.6, "<= 0.7", "yes"],
        ["strip-st", "ckptsurgery remap", "ckptsurgery remap --no-verify", 1.1, "<= 1.05", "NO"],
    ]


def test_a_nearly_full_disk_is_warned_of(tmp_path: Path) -> None:
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("bench", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench
    spec.loader.exec_module(bench)
    approaches = bench.TASKS["strip-st"].approaches(tmp_path, 1.0)
    free = shutil.disk_usage(tmp_path).free
    fits = free / 2e9 / (len(approaches) + 1) / 2  # a size whose outputs fit twice over
    assert bench.disk_warning(tmp_path, approaches, fits) is None
    warning = bench.disk_warning(tmp_path, approaches, fits * 4)
    assert warning is not None and "GB free" in warning


def test_bench_values_task(tmp_path: Path) -> None:
    """diff --values against the naive load-both loop; at this size its memory is the import
    of torch and a fixed cost: the issue's bound with a negligible largest tensor."""
    rows = _bench(tmp_path, "values")
    by = {r["approach"]: r for r in rows if r["task"] == "values"}
    assert set(by) == {
        "import torch",
        "naive load_file x2 + float64 loop (baseline)",
        "ckptsurgery diff --values",
    }
    floor = by["import torch"]["peak_rss_mb"]
    assert by["ckptsurgery diff --values"]["peak_rss_mb"] <= floor + 100  # type: ignore[operator]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.safetensors",
        "model_b.safetensors",
    ]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7])
def test_each_approach_follows_every_other_equally_often(n: int) -> None:
    """A run slows the next one: over the balanced orders, every approach runs once per
    order and directly follows each other approach the same number of times."""
    sys.path.insert(0, str(BENCH.parent))
    try:
        from bench import balanced_orders
    finally:
        sys.path.remove(str(BENCH.parent))
    orders = balanced_orders(n)
    assert len(orders) == (n if n % 2 == 0 else 2 * n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    follows: dict[tuple[int, int], int] = {}
    for order in orders:
        for before, after in itertools.pairwise(order):
            follows[before, after] = follows.get((before, after), 0) + 1
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
    assert sorted(follows) == pairs
    assert len(set(follows.values())) <= 1
