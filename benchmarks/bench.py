"""Speed and peak memory of ckptsurgery against the naive way, side by side in one run.

    python benchmarks/bench.py                 # every task, 3 paired runs each
    python benchmarks/bench.py diff --runs 5   # one task
    python benchmarks/bench.py --workdir /tmp/bench --keep   # reuse generated inputs

Inputs are generated deterministically into the work folder (nothing is downloaded). Every
approach runs as its own child process, started from a small launcher; wall time is measured
around it and peak RSS is that child's ``ru_maxrss``, so the numbers include interpreter and
import costs exactly as a user pays them. Runs of the approaches of one task are interleaved
(paired) and the table shows medians.

Tasks:
  diff   a safetensors checkpoint of torchvision's vit_h_14 (632M parameters, 2.5 GB) against
         torchvision:vit_h_14. Approaches: `import torch, torchvision` alone (the floor any
         approach pays), `ckptsurgery diff` (model on meta, header only), and the naive way
         (build the model on CPU, load the file, load_state_dict(strict=False)).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PY = sys.executable
CLI = [PY, "-m", "ckptsurgery"]


@dataclass(frozen=True)
class Approach:
    name: str
    argv: list[str]


@dataclass(frozen=True)
class Task:
    name: str
    describe: str
    prepare: Callable[[Path], None]
    approaches: Callable[[Path], list[Approach]]
    baseline: str  # the approach the others are compared with


# A forked child inherits its parent's peak RSS in ru_maxrss (Linux keeps the high-water mark
# across exec), and this script may have imported torch to prepare inputs. So each approach
# runs under a small launcher process, whose own children start from its few MB; the
# launcher reports its children's peak RSS and the wall time around the child.
_LAUNCHER = """
import resource, subprocess, sys, time
start = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - start
sys.stderr.write(r.stderr.decode())
print(r.returncode, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def run_child(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process, which must succeed."""
    proc = subprocess.run([PY, "-c", _LAUNCHER, *argv], capture_output=True, text=True)
    code, wall, kib = proc.stdout.split()
    if int(code) not in (0, 1):  # diff exits 1 for "incompatible", still a result
        raise RuntimeError(f"{' '.join(argv)} failed ({code}):\n{proc.stderr}")
    return float(wall), int(kib) / 1024  # ru_maxrss is in KiB on Linux


# -- diff ----------------------------------------------------------------------------------


def _prepare_diff(work: Path) -> None:
    """vit_h_14.safetensors: the real key set and shapes, written without building the model.

    The model is built on the meta device for its shapes; the data section is a sparse run
    of zero bytes (the values do not matter to a key/shape match), so the 2.5 GB file costs
    seconds and almost no disk.
    """
    out = work / "vit_h_14.safetensors"
    if out.exists():
        return
    import torch
    import torchvision

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from ckptsurgery.io.dtypes import info_of
    from ckptsurgery.io.safetensors_format import encode_header

    with torch.device("meta"):
        model = torchvision.models.vit_h_14()
    items = [(k, info_of(v)) for k, v in model.state_dict().items()]
    header, _ = encode_header(items, {"format": "pt"})
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(info.nbytes for _, info in items))
    tmp.rename(out)


_NAIVE_DIFF = """
import sys, torch, torchvision
from safetensors.torch import load_file
model = torchvision.models.vit_h_14()
result = model.load_state_dict(load_file(sys.argv[1]), strict=False)
print(len(result.missing_keys), len(result.unexpected_keys))
"""


def _diff_approaches(work: Path) -> list[Approach]:
    src = str(work / "vit_h_14.safetensors")
    return [
        Approach("import torch, torchvision", [PY, "-c", "import torch, torchvision"]),
        Approach("ckptsurgery diff", [*CLI, "diff", src, "--model", "torchvision:vit_h_14"]),
        Approach("naive (CPU model + load_file)", [PY, "-c", _NAIVE_DIFF, src]),
    ]


TASKS = {
    "diff": Task(
        "diff",
        "vit_h_14 safetensors (632M params) vs torchvision:vit_h_14",
        _prepare_diff,
        _diff_approaches,
        baseline="import torch, torchvision",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tasks", nargs="*", metavar="TASK", help=f"some of {', '.join(TASKS)}")
    parser.add_argument("--runs", type=int, default=3, help="paired runs per approach")
    parser.add_argument("--workdir", type=Path, default=None, help="where inputs are generated")
    parser.add_argument("--keep", action="store_true", help="keep the generated inputs")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ckptsurgery-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for name in args.tasks or list(TASKS):
            task = TASKS[name]
            print(f"preparing {name}: {task.describe}", file=sys.stderr)
            task.prepare(work)
            approaches = task.approaches(work)
            samples: dict[str, list[tuple[float, float]]] = {a.name: [] for a in approaches}
            for i in range(args.runs):
                for a in approaches:
                    samples[a.name].append(run_child(a.argv))
                print(f"  run {i + 1}/{args.runs} done", file=sys.stderr)
            med = {
                n: (statistics.median(w for w, _ in s), statistics.median(m for _, m in s))
                for n, s in samples.items()
            }
            base_wall, base_mem = med[task.baseline]
            for a in approaches:
                wall, mem = med[a.name]
                rows.append(
                    {
                        "task": name,
                        "approach": a.name,
                        "wall_s": round(wall, 2),
                        "peak_rss_mb": round(mem),
                        "time_ratio": round(wall / base_wall, 2),
                        "extra_mb": round(mem - base_mem),
                    }
                )
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(json.dumps(rows, indent=2))
        return
    from tabulate import tabulate

    headers = ["task", "approach", "wall s", "peak RSS MB", "x baseline time", "+MB vs baseline"]
    table = [
        [r["task"], r["approach"], r["wall_s"], r["peak_rss_mb"], r["time_ratio"], r["extra_mb"]]
        for r in rows
    ]
    print(tabulate(table, headers=headers, tablefmt="github"))
    print(f"\nmedians of {args.runs} paired runs; baseline = the first approach of each task")


if __name__ == "__main__":
    main()
