"""Streaming: renaming a big safetensors file costs a bounded buffer, not the file's size."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import cli_run

from ckptsurgery.io.dtypes import TensorInfo
from ckptsurgery.io.safetensors_format import encode_header

MB = 1024 * 1024


def _big_safetensors(path: Path, tensors: int = 3, mb_each: int = 100) -> None:
    """A ~300 MB file written without torch: real header, patterned data (no sparse holes)."""
    items = [(f"a.layer{i}.weight", TensorInfo((mb_each * MB // 4,), "float32", mb_each * MB))
             for i in range(tensors)]  # fmt: skip
    header, _ = encode_header(items, {"format": "pt"})
    chunk = bytes(range(256)) * (MB // 256)
    with open(path, "wb") as f:
        f.write(header)
        for _ in range(tensors * mb_each):
            f.write(chunk)


# A forked child inherits its parent's peak RSS in ru_maxrss (Linux keeps the high-water mark
# across exec), and this test process has imported torch. So the command runs under a small
# launcher process, whose own children start from its few MB.
_LAUNCHER = """
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
sys.stderr.write(r.stderr.decode())
print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _peak_rss_mb(argv: list[str]) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *argv], capture_output=True, text=True, check=True
    )
    code, kib = proc.stdout.split()
    assert code == "0", proc.stderr
    return int(kib) / 1024


def _data_digest(path: Path) -> str:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_safetensors_rename_streams_in_bounded_memory(tmp_path: Path) -> None:
    src, out = tmp_path / "big.safetensors", tmp_path / "out.safetensors"
    _big_safetensors(src)
    argv = [sys.executable, "-m", "ckptsurgery", "remap", str(src), "-o", str(out),
            "--strip-prefix", "a."]  # fmt: skip
    peak = _peak_rss_mb(argv)
    # Each tensor is 100 MB and the file 300 MB: reading a tensor whole, or importing torch
    # (~650 MB), would blow far past this bound.
    assert peak < 96, f"peak RSS {peak:.0f} MB"
    assert _data_digest(out) == _data_digest(src)  # every data byte copied unchanged

    peak = _peak_rss_mb([sys.executable, "-m", "ckptsurgery", "inspect", str(out)])
    assert peak < 64, f"inspect peak RSS {peak:.0f} MB"


def _big_torch_zip(path: Path, tensors: int = 3, mb_each: int = 100) -> None:
    """A ~300 MB torch archive written by ckptsurgery's own writer (no 300 MB in this process)."""
    from ckptsurgery.io.base import Checkpoint
    from ckptsurgery.io.torchzip import write_torch_zip

    chunk = bytes(range(256)) * (MB // 256)

    class Patterned(Checkpoint):
        def __init__(self) -> None:
            self.infos = {
                f"a.layer{i}.weight": TensorInfo((mb_each * MB // 4,), "float32", mb_each * MB)
                for i in range(tensors)
            }
            self.aliases = {}

        def raw_bytes(self, name: str) -> bytes:
            raise AssertionError("streamed, never whole")

        def tensor(self, name: str) -> object:  # type: ignore[override]
            raise AssertionError("streamed, never whole")

        def write_data(self, name: str, f: object) -> int:
            for _ in range(mb_each):
                f.write(chunk)  # type: ignore[attr-defined]
            return mb_each * MB

    with open(path, "wb") as f:
        write_torch_zip(f, Patterned(), [(n, n) for n in Patterned().infos])


def _record_digests(path: Path) -> list[str]:
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return [
            hashlib.sha256(zf.read(i)).hexdigest() for i in zf.infolist() if "/data/" in i.filename
        ]


def test_torch_zip_rename_streams_in_bounded_memory(tmp_path: Path) -> None:
    src = tmp_path / "big.pt"
    _big_torch_zip(src)
    for out in (tmp_path / "out.pt", tmp_path / "out.safetensors"):
        argv = [sys.executable, "-m", "ckptsurgery", "remap", str(src), "-o", str(out),
                "--strip-prefix", "a."]  # fmt: skip
        peak = _peak_rss_mb(argv)
        # 100 MB tensors, a 300 MB file: neither a whole tensor nor torch (~650 MB) fits here
        assert peak < 96, f"{out.name}: peak RSS {peak:.0f} MB"
    assert _record_digests(tmp_path / "out.pt") == _record_digests(src)
    with open(tmp_path / "out.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        data = hashlib.sha256(f.read()).hexdigest()
    whole = hashlib.sha256()
    for _ in range(300):
        whole.update(bytes(range(256)) * (MB // 256))
    assert data == whole.hexdigest()

    peak = _peak_rss_mb([sys.executable, "-m", "ckptsurgery", "inspect", str(src)])
    assert peak < 64, f"inspect peak RSS {peak:.0f} MB"


# --- the progress line ---------------------------------------------------------------------


def test_progress_line_on_request_only(tmp_path: Path) -> None:
    import io

    from ckptsurgery.render.progress import AUTO_MIN_BYTES, wanted

    src = tmp_path / "m.safetensors"
    _big_safetensors(src, tensors=2, mb_each=1)
    result = cli_run("remap", src, "-o", tmp_path / "a.pt", "--progress")
    assert result.exit_code == 0, result.output
    bar = [part for part in result.stderr.split("\r") if part.startswith("writing a.pt")]
    assert bar and "100%" in bar[-1] and "2.00M/2.00M" in bar[-1]
    assert result.stdout == ""
    result = cli_run("remap", src, "-o", tmp_path / "b.pt")
    assert result.exit_code == 0 and "\r" not in result.stderr  # not a terminal: no bar

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert wanted(AUTO_MIN_BYTES, None, Tty()) and not wanted(AUTO_MIN_BYTES - 1, None, Tty())
    assert not wanted(AUTO_MIN_BYTES, None, io.StringIO())
    assert wanted(1, True, io.StringIO()) and not wanted(AUTO_MIN_BYTES, False, Tty())


def test_the_library_reports_progress_to_a_callback_and_prints_nothing(
    tmp_path: Path, capsys: Any
) -> None:
    import ckptsurgery as cs

    src = tmp_path / "m.safetensors"
    _big_safetensors(src, tensors=3, mb_each=1)
    calls: list[tuple[int, int]] = []
    cs.remap(
        src, tmp_path / "o.safetensors", cs.Rules(), progress=lambda d, t: calls.append((d, t))
    )
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    total = calls[-1][1]
    assert total == 3 * MB and calls[-1][0] == total
    done = [d for d, _ in calls]
    assert done == sorted(done) and all(t == total for _, t in calls)
