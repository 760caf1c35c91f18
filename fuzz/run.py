"""Run the fuzz harnesses of ``fuzz/harnesses.py`` under atheris (libFuzzer).

    python fuzz/run.py                      # every harness, a short burst each (make fuzz)
    python fuzz/run.py --long               # every harness, 1,000,000 executions each
    python fuzz/run.py safetensors --runs 5000000 [-- LIBFUZZER_FLAG ...]
    python fuzz/run.py torch_zip --seconds 600

Each harness runs in a process of its own with ``-timeout=1`` (a second per input at most)
and ``-rss_limit_mb=512`` (torch_file: 1100, torch alone takes ~540 MB), over its seeds (``fuzz/corpus/<harness>``, made by
``make_corpus.py`` when missing), its regression inputs (``tests/fuzz_corpus/<harness>``)
and the corpus it grows (``fuzz/work/<harness>``, not committed). A crashing input is
written to ``fuzz/crashes/``; minimise it with ``-minimize_crash=1 -runs=100000`` and add
it to ``tests/fuzz_corpus/<harness>/`` once the parser is fixed. The exit status is
non-zero when any harness crashed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NAMES = (
    "safetensors",
    "torch_zip",
    "unpickler",
    "torch_file",
    "dcp",
    "index_json",
    "recipe",
)
# imported before fuzzing starts (not instrumented): the first input must not pay for them
PRELOAD = {
    "torch_file": ("torch", "numpy"),
    "torch_zip": ("numpy",),
    "dcp": ("numpy",),
    "recipe": ("tomllib",),
}
# A second per input; 512 MB of memory (over the ~540 MB that importing torch itself takes,
# for the harness whose files go through torch.load).
TIMEOUT = "-timeout=1"
RSS_MB = {"torch_file": 1100}


def fuzz_one(name: str, flags: list[str]) -> None:
    """Fuzz one harness in this process (never returns normally: libFuzzer exits)."""
    import atheris

    sys.path.insert(0, str(HERE))
    for module in PRELOAD.get(name, ()):
        importlib.import_module(module)
    with atheris.instrument_imports(include=["ckptsurgery"]):
        import harnesses

        for module in harnesses.MODULES[name]:
            importlib.import_module(module)
    entry = harnesses.HARNESSES[name]
    seeds = HERE / "corpus" / name
    regressions = ROOT / "tests" / "fuzz_corpus" / name
    work = HERE / "work" / name
    crashes = HERE / "crashes"
    work.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    dirs = [str(d) for d in (work, seeds, regressions) if d.is_dir()]
    for d in dirs[1:]:  # warm up: lazy imports and first-call costs happen here, not in a run
        for f in sorted(Path(d).iterdir()):
            entry(f.read_bytes())
    if any(f.startswith("-minimize_crash") or not f.startswith("-") for f in flags):
        dirs = []  # a crash to minimise or inputs to replay: exactly what was given
    rss = f"-rss_limit_mb={RSS_MB.get(name, 512)}"
    args = [sys.argv[0], TIMEOUT, rss, f"-artifact_prefix={crashes}/{name}-", *flags, *dirs]
    atheris.Setup(args, entry)
    atheris.Fuzz()


def run(name: str, flags: list[str], log: Path) -> tuple[int, int, float]:
    """Fuzz ``name`` in a child process, its output to ``log``; (exit status, executions,
    seconds)."""
    cmd = [sys.executable, str(Path(__file__)), "--child", name, *flags, "-print_final_stats=1"]
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    start = time.monotonic()
    with open(log, "w") as out:
        child = subprocess.Popen(
            cmd, env={**os.environ, "PYTHONPATH": path}, stdout=out, stderr=out
        )
        status = child.wait()
    for base in ("/dev/shm", tempfile.gettempdir()):  # the child's scratch folder
        for folder in Path(base).glob(f"ckptsurgery-fuzz-{child.pid}-*"):
            shutil.rmtree(folder, ignore_errors=True)
    seconds = time.monotonic() - start
    text = log.read_text(errors="replace")
    found = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    return status, int(found[-1]) if found else 0, seconds


def main() -> int:
    if sys.argv[1:2] == ["--child"]:  # run.py --child NAME FLAG...: one harness, here
        fuzz_one(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("names", nargs="*", help=f"harnesses (default: all): {', '.join(NAMES)}")
    parser.add_argument("--seconds", type=int, help="fuzz each harness this long")
    parser.add_argument("--runs", type=int, help="fuzz each harness for this many executions")
    parser.add_argument("--long", action="store_true", help="1,000,000 executions each")
    parser.add_argument("--logs", type=Path, help="libFuzzer's output (default fuzz/work/logs)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    flags = argv[cut + 1 :]  # after "--": libFuzzer's own flags
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        parser.error(f"unknown harness {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    names = args.names or list(NAMES)
    if not (HERE / "corpus" / "_support").is_dir():
        subprocess.run([sys.executable, str(HERE / "make_corpus.py")], check=True)
    if args.long:
        flags.append("-runs=1000000")
    elif args.runs:
        flags.append(f"-runs={args.runs}")
    else:
        flags.append(f"-max_total_time={args.seconds or 8}")
    logs = args.logs or HERE / "work" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        log = logs / f"{name}.log"
        status, runs, seconds = run(name, flags, log)
        verdict = "ok" if status == 0 else f"CRASH (exit {status}; see fuzz/crashes/)"
        print(f"{name:12} {runs:>10,} executions in {seconds:7.1f} s  {verdict}", flush=True)
        if status != 0:
            failed.append(name)
            tail = log.read_text(errors="replace").splitlines()[-40:]
            print("\n".join(tail), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
