"""A real ``remap`` process killed part-way never damages the previous output.

SIGKILL cannot be caught: the previous OUT must still be intact (the new bytes go to a
hidden temporary file beside it, renamed over OUT only once complete), but that temporary
file stays behind; nothing can clean it up. SIGTERM is handled like Ctrl-C: the write
stops, the temporary file is removed, the exit code is 130.
"""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ckptsurgery as cs

SIZE_MB = 100
TMP_NAME = re.compile(r"^\.out\.safetensors\..+\.tmp$")  # atomic_write's mkstemp pattern


@pytest.fixture(scope="module")
def big_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src") / "big.safetensors"
    per = 4 * 1024 * 1024 // 4  # 4 MB of float32 per tensor
    cs.save_state_dict(
        {f"layer{i}.weight": torch.full((per,), float(i)) for i in range(SIZE_MB // 4)}, src
    )
    return src


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "out.safetensors")


def _start_and_signal(src: Path, out: Path, sig: int) -> tuple[int, str]:
    """Start ``remap SRC -o OUT --force`` and send ``sig`` once its temporary file has data.

    Returns the exit status and stderr. Fails if the write finished before it was caught.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptsurgery", "remap", str(src), "-o", str(out), "--force"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            tmps = [p for p in out.parent.iterdir() if TMP_NAME.match(p.name)]
            try:
                if tmps and tmps[0].stat().st_size > 1024 * 1024:
                    proc.send_signal(sig)
                    break
            except FileNotFoundError:  # renamed or removed between listing and stat
                pass
            if proc.poll() is not None:
                pytest.fail(f"remap finished before it could be interrupted: {proc.stderr}")
            time.sleep(0.001)
        else:
            pytest.fail("remap never started writing")
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, stderr


@pytest.fixture
def previous_out(tmp_path: Path) -> Path:
    out = tmp_path / "outdir" / "out.safetensors"
    out.parent.mkdir()
    cs.save_state_dict({"previous": torch.arange(10, dtype=torch.float32)}, out)
    return out


def test_sigkill_leaves_the_previous_output_intact(big_source: Path, previous_out: Path) -> None:
    before = _sha(previous_out)
    src_before = _sha(big_source)

    returncode, _ = _start_and_signal(big_source, previous_out, signal.SIGKILL)

    assert returncode == -signal.SIGKILL
    assert _sha(previous_out) == before
    assert _sha(big_source) == src_before
    assert cs.load_state_dict(previous_out).keys() == {"previous"}
    # A SIGKILL'd process cannot remove its temporary file; it must at least be hidden and
    # recognisable as ours (".out.safetensors.<random>.tmp"), never a half-written OUT.
    leftovers = _temporaries(previous_out.parent)
    assert len(leftovers) <= 1
    assert all(TMP_NAME.match(name) for name in leftovers), leftovers


def test_sigterm_leaves_the_previous_output_and_no_temporary(
    big_source: Path, previous_out: Path
) -> None:
    before = _sha(previous_out)

    returncode, stderr = _start_and_signal(big_source, previous_out, signal.SIGTERM)

    assert returncode == 130, stderr
    assert stderr.rstrip().splitlines()[-1] == "Interrupted; nothing was written."
    assert "Traceback" not in stderr
    assert _sha(previous_out) == before
    assert _temporaries(previous_out.parent) == []
