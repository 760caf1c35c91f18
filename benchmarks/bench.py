"""Speed and peak memory of ckptsurgery against `cp` and the naive ways, side by side in one run.

examples:
  python benchmarks/bench.py                        # every task, 3 paired runs, 2 GB inputs
  python benchmarks/bench.py strip-st diff --runs 5 # some tasks, more runs
  python benchmarks/bench.py --size 0.05 --runs 1   # a quick check (inputs 0.05 x 2 GB)
  python benchmarks/bench.py --workdir /tmp/bench   # inputs kept there, reused by later runs
  python benchmarks/bench.py --json                 # the rows as JSON instead of the table
  python benchmarks/bench.py --base-src /tmp/base/src  # paired against an older checkout

Inputs are generated deterministically into the work folder (nothing is downloaded): a
checkpoint of a few hundred float32 and bfloat16 tensors with a `module.` prefix (2 GB at
--size 1), as safetensors and as a torch.save zip, and three 1 GB checkpoints to average.
At --size 1 a run of every task needs about 15 GB of free disk (inputs, and the outputs of
one task at a time) and 6 GB of memory (the naive approaches, and making the torch input).

Each default-path ckptsurgery row is run once more with --json to show where its time goes
(copy: reading, converting, writing and the checksums on the way; fsync; wait: for the helper
threads' digests and source checks; verify: the final check of the finished output;
read_back: the seconds the read-back threads spent hashing the output back, trailing the
copy and then during the final fsync).

Every approach runs as its own child process (after an untimed `sync` of the whole system,
so that no run writes the previous one's pages), started from a small launcher: wall time is
measured around it and peak RSS is that child's ru_maxrss, so the numbers include interpreter
and import costs exactly as a user pays them (ckptsurgery's bytecode is compiled first, as an
install would have it). Every approach that writes fsyncs its output (`cp` is followed by
`sync FILE`), as ckptsurgery does before it renames. The approaches of one task run
interleaved (paired runs), in orders where each follows every other equally often (a run
slows the next one: use a multiple of the number of approaches as --runs, of twice that
number when it is odd); the table shows medians, and the ratio columns compare each row
with the task's baseline. Run it on an otherwise idle machine: it compares ratios.

tasks (and what ckptsurgery should reach at 2 GB):
  strip-st    strip `module.`: safetensors -> safetensors      <= 1.15x cp, <= 64 MB
  strip-pt    strip `module.`: torch zip -> torch zip          <= 1.25x cp, <= 64 MB
  pt-to-st    strip `module.`: torch zip -> safetensors        <= 1.3x cp, <= 128 MB
  keep-half   keep the even-numbered blocks (half the keys), safetensors -> safetensors
  cast-bf16   strip `module.` and cast float32 to bfloat16 (--dtype), safetensors
              -> safetensors: a streamed cast, against the naive load + .to() + save
  average     the mean of 3 x 1 GB (merge --average)  <= import torch + 3 tensors + 200 MB
  inspect-st  names, shapes and dtypes of the safetensors file <= 0.3 s, <= 32 MB
  inspect-pt  the same for the torch zip file                  <= 0.3 s, <= 32 MB
  values      diff --values of two 2 GB safetensors checkpoints (other values, same keys):
              `import torch` (the floor), the naive way (load_file both, a float64 loop),
              ckptsurgery diff --values
              <= import torch + 2 x the largest tensor + 100 MB, whatever the size
  diff        a checkpoint of torchvision's vit_h_14 (632M parameters; resnet18 below
              --size 0.5) against the model: `import torch, torchvision` alone (the floor),
              ckptsurgery diff (model on meta, header only), the naive way
              <= 1.2x the floor's wall time and at most 64 MB more
  Every ckptsurgery row should need at least 6x less memory than the naive way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PY = sys.executable
CLI = [PY, "-m", "ckptsurgery"]
SRC = Path(__file__).resolve().parents[1] / "src"
GB = 10**9


@dataclass(frozen=True)
class Approach:
    name: str
    argv: list[str]
    output: Path | None = None  # removed after every run
    env: dict[str, str] | None = None  # the child's environment (None: this one's)


@dataclass(frozen=True)
class Task:
    name: str
    describe: str
    prepare: Callable[[Path, float], None]
    approaches: Callable[[Path, float], list[Approach]]
    baseline: str  # the approach the others are compared with
    verify: list[tuple[str, str]] = field(default_factory=list)  # outputs that must agree


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


def run_child(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process, which must succeed."""
    proc = subprocess.run([PY, "-c", _LAUNCHER, *argv], capture_output=True, text=True, env=env)
    code, wall, kib = proc.stdout.split()
    if int(code) not in (0, 1):  # diff exits 1 for "incompatible", still a result
        raise RuntimeError(f"{' '.join(argv)} failed ({code}):\n{proc.stderr}")
    return float(wall), int(kib) / 1024  # ru_maxrss is in KiB on Linux


def _fsync_cp(src: Path, dst: Path) -> list[str]:
    return ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "cp", str(src), str(dst)]


# -- inputs ----------------------------------------------------------------------------------


def _layout(total: float) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of a transformer-like checkpoint of about ``total`` bytes."""

    def blocks(d: int, n: int) -> list[tuple[str, tuple[int, ...], str]]:
        out: list[tuple[str, tuple[int, ...], str]] = [
            ("module.embed.weight", (4 * d, d), "float32")
        ]
        for i in range(n):
            p = f"module.blocks.{i}."
            out += [
                (p + "norm1.weight", (d,), "float32"),
                (p + "norm1.bias", (d,), "float32"),
                (p + "attn.qkv.weight", (3 * d, d), "float32"),
                (p + "attn.qkv.bias", (3 * d,), "float32"),
                (p + "attn.proj.weight", (d, d), "float32"),
                (p + "norm2.weight", (d,), "bfloat16"),
                (p + "mlp.fc1.weight", (4 * d, d), "bfloat16"),
                (p + "mlp.fc1.bias", (4 * d,), "bfloat16"),
                (p + "mlp.fc2.weight", (d, 4 * d), "bfloat16"),
                (p + "mlp.fc2.bias", (d,), "bfloat16"),
            ]
        return out

    def size(items: list[tuple[str, tuple[int, ...], str]]) -> int:
        return sum(math.prod(s) * (4 if dt == "float32" else 2) for _, s, dt in items)

    d = 1024
    per_block = size(blocks(d, 1)) - size(blocks(d, 0))
    n = round((total - size(blocks(d, 0))) / per_block)
    if n < 4:  # small inputs: fewer, narrower blocks
        n = 4
        d = max(16, int(1024 * math.sqrt(total / size(blocks(1024, 4)))) // 16 * 16)
    return blocks(d, n)


def _write_inputs(stem: Path, total: float, seed: int, *, torch_too: bool) -> None:
    """``stem``.safetensors (and ``stem``.pt, through torch.save), deterministic values."""
    st_path, pt_path = stem.with_suffix(".safetensors"), stem.with_suffix(".pt")
    if st_path.exists() and (pt_path.exists() or not torch_too):
        return
    import numpy as np

    sys.path.insert(0, str(SRC))
    from ckptsurgery.io.dtypes import TensorInfo
    from ckptsurgery.io.safetensors_format import encode_header

    layout = _layout(total)
    rng = np.random.Generator(np.random.PCG64(seed))
    items = [
        (name, TensorInfo(shape, dt, math.prod(shape) * (4 if dt == "float32" else 2)))
        for name, shape, dt in layout
    ]
    header, order = encode_header(items, {"format": "pt"})
    tmp = st_path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        for _, info in order:
            values = rng.standard_normal(info.numel, dtype=np.float32)
            if info.dtype == "bfloat16":
                values = (values.view(np.uint32) >> 16).astype(np.uint16)
            f.write(values.tobytes())
    tmp.rename(st_path)
    if torch_too:
        import safetensors.torch
        import torch

        sd = safetensors.torch.load_file(st_path)
        torch.save({name: sd[name] for name, _, _ in layout}, pt_path.with_suffix(".tmp"))
        pt_path.with_suffix(".tmp").rename(pt_path)


def _prepare_model(work: Path, size: float) -> None:
    _write_inputs(work / "model", 2 * GB * size, seed=0, torch_too=True)


def _prepare_average(work: Path, size: float) -> None:
    for i in range(3):
        _write_inputs(work / f"avg{i}", 1 * GB * size, seed=100 + i, torch_too=False)


# -- naive scripts (each fsyncs what it writes, as cp + sync and ckptsurgery do) -------------

_FSYNC = "import os\ndef fsync(p):\n    fd = os.open(p, os.O_RDONLY); os.fsync(fd); os.close(fd)\n"

_NAIVE_TORCH = (
    _FSYNC
    + """
import sys, torch
sd = torch.load(sys.argv[1], weights_only=True)
sd = {k.removeprefix("module."): v for k, v in sd.items()}
torch.save(sd, sys.argv[2]); fsync(sys.argv[2])
"""
)

_NAIVE_TORCH_TO_ST = (
    _FSYNC
    + """
import sys, torch
from safetensors.torch import save_file
sd = torch.load(sys.argv[1], weights_only=True)
save_file({k.removeprefix("module."): v for k, v in sd.items()}, sys.argv[2]); fsync(sys.argv[2])
"""
)

_NAIVE_ST = (
    _FSYNC
    + """
import sys, fnmatch
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1])
keep = sys.argv[3] if len(sys.argv) > 3 else "*"
sd = {k.removeprefix("module."): v for k, v in sd.items() if fnmatch.fnmatchcase(k, keep)}
save_file(sd, sys.argv[2], metadata={"format": "pt"}); fsync(sys.argv[2])
"""
)

_NAIVE_CAST = (
    _FSYNC
    + """
import sys, torch
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1])
sd = {k.removeprefix("module."): v.to(torch.bfloat16) if v.is_floating_point() else v
      for k, v in sd.items()}
save_file(sd, sys.argv[2], metadata={"format": "pt"}); fsync(sys.argv[2])
"""
)

_NAIVE_AVERAGE = (
    _FSYNC
    + """
import sys, torch
from safetensors.torch import load_file, save_file
sds = [load_file(p) for p in sys.argv[1:4]]
out = {k: (sum(sd[k].float() for sd in sds) / 3).to(v.dtype) for k, v in sds[0].items()}
save_file(out, sys.argv[4], metadata={"format": "pt"}); fsync(sys.argv[4])
"""
)

_NAIVE_INSPECT_PT = """
import sys, torch
sd = torch.load(sys.argv[1], weights_only=True)
for k, v in sd.items(): print(k, list(v.shape), v.dtype)
"""

_NAIVE_INSPECT_ST = """
import sys
from safetensors import safe_open
with safe_open(sys.argv[1], "pt") as f:
    for k in f.keys(): s = f.get_slice(k); print(k, s.get_shape(), s.get_dtype())
"""

_KEEP_EVEN = "module.blocks.*[02468].*"


_STRIP = ["--strip-prefix", "module."]
Approaches = Callable[[Path, float], list[Approach]]


def _rewrite(
    src: str,
    ext: str,
    naive: tuple[str, str],
    remap_args: list[str],
    *,
    naive_args: tuple[str, ...] = (),
    cp: str = "cp + fsync",
    surgery: str = "ckptsurgery remap",
) -> Approaches:
    """A file-to-file task: ``cp`` of the source (the baseline), a naive script (label,
    code) writing ``naive.EXT``, and ``ckptsurgery remap`` writing ``cs.EXT``: as it runs by
    default (the output re-read and checked before it takes its name) and with ``--no-verify``."""

    def approaches(work: Path, size: float) -> list[Approach]:
        source, copy = work / src, work / "cp.out"
        naive_out, cs_out = work / f"naive.{ext}", work / f"cs.{ext}"
        fast_out = work / f"cs_no_verify.{ext}"
        label, code = naive
        remap = [*CLI, "remap", str(source)]
        return [
            Approach(cp, _fsync_cp(source, copy), copy),
            Approach(label, [PY, "-c", code, str(source), str(naive_out), *naive_args], naive_out),
            Approach(surgery, [*remap, "-o", str(cs_out), *remap_args], cs_out),
            Approach(
                f"{surgery} --no-verify",
                [*remap, "-o", str(fast_out), *remap_args, "--no-verify"],
                fast_out,
            ),
        ]

    return approaches


def _inspect(src: str, naive: tuple[str, str]) -> Approaches:
    """Listing a file's tensors: the interpreter's start alone, a naive script, ``inspect``."""

    def approaches(work: Path, size: float) -> list[Approach]:
        label, code = naive
        return [
            Approach("python -c pass", [PY, "-c", "pass"]),
            Approach(label, [PY, "-c", code, str(work / src)]),
            Approach("ckptsurgery inspect", [*CLI, "inspect", str(work / src)]),
        ]

    return approaches


_NAIVE_ST_LABEL = "safetensors load_file + save_file"
_strip_st = _rewrite("model.safetensors", "safetensors", (_NAIVE_ST_LABEL, _NAIVE_ST), _STRIP)
_strip_pt = _rewrite("model.pt", "pt", ("naive torch.load + torch.save", _NAIVE_TORCH), _STRIP)
_pt_to_st = _rewrite(
    "model.pt", "safetensors", ("naive torch.load + save_file", _NAIVE_TORCH_TO_ST), _STRIP
)
_cast_bf16 = _rewrite(
    "model.safetensors",
    "safetensors",
    ("naive load_file + .to(bfloat16) + save_file", _NAIVE_CAST),
    [*_STRIP, "--dtype", "bfloat16"],
    surgery="ckptsurgery remap --dtype bfloat16",
)
_keep_half = _rewrite(
    "model.safetensors",
    "safetensors",
    (_NAIVE_ST_LABEL, _NAIVE_ST),
    ["--keep", _KEEP_EVEN, *_STRIP],
    naive_args=(_KEEP_EVEN,),
    cp="cp + fsync (whole file)",
    surgery="ckptsurgery remap --keep",
)
_inspect_st = _inspect(
    "model.safetensors", ("safetensors safe_open (keys, shapes)", _NAIVE_INSPECT_ST)
)
_inspect_pt = _inspect("model.pt", ("naive torch.load (keys, shapes)", _NAIVE_INSPECT_PT))


def _average(work: Path, size: float) -> list[Approach]:
    srcs = [str(work / f"avg{i}.safetensors") for i in range(3)]
    return [
        Approach("import torch", [PY, "-c", "import torch"]),
        Approach(
            "naive load_file x3 + mean + save_file",
            [PY, "-c", _NAIVE_AVERAGE, *srcs, str(work / "naive.safetensors")],
            work / "naive.safetensors",
        ),
        Approach(
            "ckptsurgery merge --average",
            [*CLI, "merge", *srcs, "--average", "-o", str(work / "cs.safetensors")],
            work / "cs.safetensors",
        ),
    ]


def _inspect_st(work: Path, size: float) -> list[Approach]:
    src = str(work / "model.safetensors")
    return [
        Approach("python -c pass", [PY, "-c", "pass"]),
        Approach("safetensors safe_open (keys, shapes)", [PY, "-c", _NAIVE_INSPECT_ST, src]),
        Approach("ckptsurgery inspect", [*CLI, "inspect", src]),
    ]


def _inspect_pt(work: Path, size: float) -> list[Approach]:
    src = str(work / "model.pt")
    return [
        Approach("python -c pass", [PY, "-c", "pass"]),
        Approach("naive torch.load (keys, shapes)", [PY, "-c", _NAIVE_INSPECT_PT, src]),
        Approach("ckptsurgery inspect", [*CLI, "inspect", src]),
    ]


# -- values ----------------------------------------------------------------------------------


def _prepare_values(work: Path, size: float) -> None:
    _write_inputs(work / "model", 2 * GB * size, seed=0, torch_too=False)
    _write_inputs(work / "model_b", 2 * GB * size, seed=1, torch_too=False)


# The same statistics as diff --values, the way a user writes them: both files in memory.
_NAIVE_VALUES = """
import sys, torch
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
for k, x in a.items():
    y = b[k]
    equal = x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    x, y = x.double(), y.double()
    d = x - y
    print(k, equal, float(d.abs().max()), float(d.norm() / y.norm()),
          float(torch.dot(x.flatten(), y.flatten()) / (x.norm() * y.norm())),
          int(x.isnan().sum()), int(y.isnan().sum()), int(x.isinf().sum()), int(y.isinf().sum()))
"""


def _values_approaches(work: Path, size: float) -> list[Approach]:
    a, b = str(work / "model.safetensors"), str(work / "model_b.safetensors")
    return [
        Approach("import torch", [PY, "-c", "import torch"]),
        Approach("naive load_file x2 + float64 loop", [PY, "-c", _NAIVE_VALUES, a, b]),
        Approach("ckptsurgery diff --values", [*CLI, "diff", a, "--against", b, "--values"]),
    ]


# -- diff ----------------------------------------------------------------------------------


def _diff_model(size: float) -> str:
    return "vit_h_14" if size >= 0.5 else "resnet18"


def _prepare_diff(work: Path, size: float) -> None:
    """The model's real key set and shapes, written without building the model.

    The model is built on the meta device for its shapes; the data section is a sparse run
    of zero bytes (the values do not matter to a key/shape match), so a 2.5 GB file costs
    seconds and almost no disk.
    """
    name = _diff_model(size)
    out = work / f"{name}.safetensors"
    if out.exists():
        return
    import torch
    import torchvision

    sys.path.insert(0, str(SRC))
    from ckptsurgery.io.dtypes import info_of
    from ckptsurgery.io.safetensors_format import encode_header

    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
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
model = getattr(torchvision.models, sys.argv[2])()
result = model.load_state_dict(load_file(sys.argv[1]), strict=False)
print(len(result.missing_keys), len(result.unexpected_keys))
"""


def _diff_approaches(work: Path, size: float) -> list[Approach]:
    name = _diff_model(size)
    src = str(work / f"{name}.safetensors")
    return [
        Approach("import torch, torchvision", [PY, "-c", "import torch, torchvision"]),
        Approach("ckptsurgery diff", [*CLI, "diff", src, "--model", f"torchvision:{name}"]),
        Approach("naive (CPU model + load_file)", [PY, "-c", _NAIVE_DIFF, src, name]),
    ]


TASKS = {
    "strip-st": Task("strip-st", "strip module.: safetensors -> safetensors", _prepare_model,
                     _strip_st, "cp + fsync",
                     [("naive.safetensors", "cs.safetensors")]),
    "strip-pt": Task("strip-pt", "strip module.: torch zip -> torch zip", _prepare_model,
                     _strip_pt, "cp + fsync", [("naive.pt", "cs.pt")]),
    "pt-to-st": Task("pt-to-st", "strip module.: torch zip -> safetensors", _prepare_model,
                     _pt_to_st, "cp + fsync", [("naive.safetensors", "cs.safetensors")]),
    "keep-half": Task("keep-half", "keep half the keys, safetensors", _prepare_model,
                      _keep_half, "cp + fsync (whole file)",
                      [("naive.safetensors", "cs.safetensors")]),
    "cast-bf16": Task("cast-bf16", "strip module. and cast to bfloat16, safetensors",
                      _prepare_model, _cast_bf16, "cp + fsync",
                      [("naive.safetensors", "cs.safetensors")]),
    "average": Task("average", "mean of 3 safetensors checkpoints", _prepare_average,
                    _average, "naive load_file x3 + mean + save_file"),
    "inspect-st": Task("inspect-st", "names, shapes, dtypes of the safetensors file",
                       _prepare_model, _inspect_st, "safetensors safe_open (keys, shapes)"),
    "inspect-pt": Task("inspect-pt", "names, shapes, dtypes of the torch zip file",
                       _prepare_model, _inspect_pt, "naive torch.load (keys, shapes)"),
    "values": Task("values", "value diff of two safetensors checkpoints", _prepare_values,
                   _values_approaches, "naive load_file x2 + float64 loop"),
    "diff": Task("diff", "checkpoint vs torchvision vit_h_14 (resnet18 below --size 0.5)",
                 _prepare_diff,
                 _diff_approaches, "import torch, torchvision"),
}  # fmt: skip


# The goals, as ratios of wall time: (task, approach, compared with, at most). "baseline" is
# the task's baseline row; the --no-verify rows check that verification costs < 5% more.
GOALS = [
    ("strip-st", "ckptsurgery remap", "baseline", 1.15),
    ("strip-pt", "ckptsurgery remap", "baseline", 1.25),
    ("pt-to-st", "ckptsurgery remap", "baseline", 1.3),
    ("keep-half", "ckptsurgery remap --keep", "baseline", 1.0),
    ("average", "ckptsurgery merge --average", "baseline", 0.7),
    ("strip-st", "ckptsurgery remap", "ckptsurgery remap --no-verify", 1.05),
    ("strip-pt", "ckptsurgery remap", "ckptsurgery remap --no-verify", 1.05),
    ("pt-to-st", "ckptsurgery remap", "ckptsurgery remap --no-verify", 1.05),
    ("keep-half", "ckptsurgery remap --keep", "ckptsurgery remap --keep --no-verify", 1.05),
]


def goal_rows(rows: list[dict[str, Any]]) -> list[list[object]]:
    """Each goal whose rows ran: task, approach, compared with, ratio, goal, met."""
    wall = {(r["task"], r["approach"].removesuffix(" (baseline)")): r["wall_s"] for r in rows}
    baseline = {r["task"]: r["wall_s"] for r in rows if r["approach"].endswith("(baseline)")}
    out: list[list[object]] = []
    for task, approach, against, most in GOALS:
        if (task, approach) not in wall:
            continue
        other = baseline.get(task) if against == "baseline" else wall.get((task, against))
        if not other:
            continue
        ratio = round(wall[task, approach] / other, 2)
        out.append([task, approach, against, ratio, f"<= {most}", "yes" if ratio <= most else "NO"])
    return out


def _same_tensors(a: Path, b: Path) -> None:
    """Both outputs hold the same names, dtypes, shapes and bytes."""
    sys.path.insert(0, str(SRC))
    import ckptsurgery as cs

    with cs.open_checkpoint(a) as x, cs.open_checkpoint(b) as y:
        if sorted(x.infos) != sorted(y.infos):
            raise RuntimeError(f"{a.name} and {b.name} hold different keys")
        for name, info in x.infos.items():
            if info != y.infos[name] or bytes(x.raw_bytes(name)) != bytes(y.raw_bytes(name)):
                raise RuntimeError(f"{a.name} and {b.name} differ at {name!r}")


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured table (text columns left, numbers right), to paste into the README."""
    cells = [[str(c) for c in r] for r in rows]
    numeric = [all(isinstance(r[i], int | float) for r in rows) for i in range(len(headers))]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                v.rjust(w) if num else v.ljust(w)
                for v, w, num in zip(values, widths, numeric, strict=True)
            )
            + " |"
        )

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if num else "-" * (w + 2)
            for w, num in zip(widths, numeric, strict=True)
        )
        + "|"
    )
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def _with_base(approaches: list[Approach], base_src: Path) -> list[Approach]:
    """Each ckptsurgery approach followed by the same run from ``base_src`` (its bytecode
    compiled first), so that the two always meet the same disk and cache state."""
    base_src = base_src.resolve()
    subprocess.run([PY, "-m", "compileall", "-q", str(base_src / "ckptsurgery")], check=True)
    env = {**os.environ, "PYTHONPATH": str(base_src)}
    out = []
    for a in approaches:
        out.append(a)
        if a.argv[: len(CLI)] == CLI:
            output = a.output and a.output.with_name(f"base_{a.output.name}")
            argv = [str(output) if a.output and arg == str(a.output) else arg for arg in a.argv]
            out.append(Approach(f"{a.name} (base)", argv, output, env))
    return out


def _default_write(a: Approach) -> bool:
    """A ckptsurgery approach that writes with the default options (this checkout's)."""
    return (
        a.env is None
        and a.argv[: len(CLI)] == CLI
        and a.output is not None
        and ("--no-verify" not in a.argv)
    )


def _breakdown(a: Approach) -> dict[str, float]:
    """The stages of one more run of ``a`` (its ``--json`` timings: copy, fsync, wait for the
    helper threads' digests and checks, verify, read_back), untimed by the launcher."""
    assert a.output is not None
    a.output.unlink(missing_ok=True)
    proc = subprocess.run([*a.argv, "--json"], capture_output=True, text=True, check=True)
    a.output.unlink(missing_ok=True)
    timings: dict[str, float] = json.loads(proc.stdout).get("timings", {})
    return timings


def disk_warning(work: Path, approaches: list[Approach], size: float) -> str | None:
    """A warning when ``work`` has less free space than the task's outputs may take (each
    approach keeps its last output, up to 2 GB at ``--size 1``, until its next run) plus a
    margin: on a nearly full disk, writes slowed two- to threefold and skewed the ratios."""
    outputs = sum(1 for a in approaches if a.output is not None)
    need = int((outputs + 1) * 2e9 * size)
    free = shutil.disk_usage(work).free
    if free >= need:
        return None
    return (
        f"only {free / 1e9:.1f} GB free in {work}; this task's outputs may take "
        f"{need / 1e9:.1f} GB with a margin: writes slow down on a nearly full disk"
    )


def _runs(approaches: list[Approach], runs: int) -> Iterator[tuple[int, Approach]]:
    """Every approach once per run, in a balanced order (:func:`balanced_orders`): a run
    slows the one after it (the naive approaches' gigabytes of memory are handed back to the
    host, and their writes still occupy the disk), so each approach must follow every other
    equally often, not always the same neighbour."""
    orders = balanced_orders(len(approaches))
    for i in range(runs):
        for k in orders[i % len(orders)]:
            yield i, approaches[k]


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``range(n)`` in which each item directly follows every other item equally
    often (a Williams design): ``n`` orders for an even ``n``, ``2n`` for an odd one."""
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [[(k + i) % n for k in first] for i in range(n)]
    if n % 2:
        orders += [order[::-1] for order in orders]
    return orders


def main() -> None:
    parser = argparse.ArgumentParser(
        usage="python benchmarks/bench.py [TASK ...] [options]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("tasks", nargs="*", metavar="TASK", help=f"some of {', '.join(TASKS)}")
    parser.add_argument("--runs", type=int, default=3, help="paired runs per approach")
    parser.add_argument(
        "--size", type=float, default=1.0, help="scale the inputs (1: 2 GB, 3 x 1 GB to average)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the inputs are generated and kept, for later runs to reuse (default: a "
        "temporary folder, removed at the end)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (its path is printed)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--base-src",
        type=Path,
        default=None,
        metavar="DIR",
        help="also run every ckptsurgery approach from another source tree (the src/ folder "
        "of an older checkout, e.g. made with `git worktree add /tmp/base REV`), paired with "
        "this one, as rows marked '(base)': a regression check that machine noise cannot fake",
    )
    args = parser.parse_args()
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")

    # An installed package ships compiled bytecode; a source checkout may not have it (or
    # PYTHONDONTWRITEBYTECODE keeps it from being written), and then every child would pay
    # for compiling ckptsurgery on each start. Compile once, as an install would.
    subprocess.run([PY, "-m", "compileall", "-q", str(SRC / "ckptsurgery")], check=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ckptsurgery-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"inputs in {work}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    try:
        for name in args.tasks or list(TASKS):
            task = TASKS[name]
            print(f"preparing {name}: {task.describe}", file=sys.stderr)
            task.prepare(work, args.size)
            os.sync()  # the inputs' own writeback must not land in the first timed runs
            approaches = task.approaches(work, args.size)
            if args.base_src is not None:
                approaches = _with_base(approaches, args.base_src)
            warning = disk_warning(work, approaches, args.size)
            if warning is not None:
                print(f"  warning: {warning}", file=sys.stderr)
            samples: dict[str, list[tuple[float, float]]] = {a.name: [] for a in approaches}
            for _, a in _runs(approaches, args.runs):
                if a.name not in samples:
                    continue
                if a.output is not None:
                    a.output.unlink(missing_ok=True)  # a fresh write every time
                # untimed: the file system settles what earlier runs left (freeing a removed
                # output's blocks, the journal), which otherwise landed in this run's fsync
                os.sync()
                try:
                    samples[a.name].append(run_child(a.argv, a.env))
                except RuntimeError:
                    if a.env is None:
                        raise
                    # an older version without this task's flags: its rows are left out
                    print(f"  {a.name}: the base version cannot run it; left out", file=sys.stderr)
                    del samples[a.name]
            approaches = [a for a in approaches if a.name in samples]
            # the outputs of the last run are compared, then removed
            for left, right in task.verify:
                _same_tensors(work / left, work / right)
            breakdowns = {a.name: _breakdown(a) for a in approaches if _default_write(a)}
            for a in approaches:
                if a.output is not None:
                    a.output.unlink(missing_ok=True)
            print(f"  {args.runs} paired runs done", file=sys.stderr)
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
                        "approach": a.name + (" (baseline)" if a.name == task.baseline else ""),
                        "wall_s": round(wall, 2),
                        "peak_rss_mb": round(mem),
                        "time_ratio": round(wall / base_wall, 2),
                        "rss_ratio": round(mem / base_mem, 2),
                        **({"breakdown": breakdowns[a.name]} if a.name in breakdowns else {}),
                    }
                )
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(json.dumps(rows, indent=2))
        return
    headers = ["task", "approach", "wall s", "peak RSS MB", "x baseline time", "x baseline RSS"]
    table = [
        [r["task"], r["approach"], r["wall_s"], r["peak_rss_mb"], r["time_ratio"], r["rss_ratio"]]
        for r in rows
    ]
    print(markdown_table(headers, table))
    stages = ["copy", "fsync", "wait", "verify", "read_back"]
    split = [
        [r["task"], r["approach"], r["wall_s"], *(r["breakdown"].get(k, "") for k in stages)]
        for r in rows
        if "breakdown" in r
    ]
    if split:
        print("\nwhere the default path's time goes (seconds, one extra run each):\n")
        print(markdown_table(["task", "approach", "wall s (median)", *stages], split))
    goals = goal_rows(rows)
    if goals:
        print("\nthe goals (ratios of median wall times):\n")
        print(markdown_table(["task", "approach", "against", "ratio", "goal", "met"], goals))
    print(
        f"\nmedians of {args.runs} paired runs; inputs {2 * args.size:g} GB "
        f"(average: 3 x {args.size:g} GB); {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
