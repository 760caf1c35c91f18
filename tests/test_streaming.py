"""Streaming: renaming a big safetensors file costs a bounded buffer, not the file's size."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

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
