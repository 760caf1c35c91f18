"""Writing is atomic: OUT appears complete or not at all, and inputs are never written."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import assert_bit_exact, sample_state_dict

import ckptsurgery as cs
from ckptsurgery.errors import FormatError, OutputError
from ckptsurgery.io import safetensors_format
from ckptsurgery.io.base import Checkpoint
from ckptsurgery.io.safetensors_format import SafetensorsCheckpoint
from ckptsurgery.io.torchzip import TorchZipCheckpoint

FORMATS = {"safetensors": ".safetensors", "torch": ".pt"}


def _source(tmp_path: Path, fmt: str = "torch") -> Path:
    src = tmp_path / ("src.pt" if fmt == "torch" else "src.safetensors")
    if fmt == "torch":
        torch.save(sample_state_dict(), src)
    else:
        cs.save_state_dict(sample_state_dict(), src)
    return src


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _fail_after_first(
    monkeypatch: pytest.MonkeyPatch, cls: type[Checkpoint], method: str, exc: BaseException
) -> None:
    """Make ``cls.method`` (a tensor fetch) work once, then raise ``exc``."""
    original: Callable[..., object] = getattr(cls, method)
    calls = []

    def failing(self: Checkpoint, name: str, *rest: object) -> object:
        calls.append(name)
        if len(calls) > 1:
            raise exc
        return original(self, name, *rest)

    monkeypatch.setattr(cls, method, failing)


# Both writers write their header (or pickle) first, then copy each tensor's bytes from its
# source as its turn comes, through write_data.
FETCH = {"safetensors": "write_data", "torch": "write_data"}
# A torch zip source is read without torch: its tensors come from the archive's records.
SOURCE_CLASS = {"torch": TorchZipCheckpoint, "safetensors": SafetensorsCheckpoint}


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
@pytest.mark.parametrize("src_fmt", ["torch", "safetensors"])
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_failure_mid_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, src_fmt: str, exc: BaseException
) -> None:
    src = _source(tmp_path, src_fmt)
    before = _listing(tmp_path)
    _fail_after_first(monkeypatch, SOURCE_CLASS[src_fmt], FETCH[fmt], exc)
    with pytest.raises(type(exc)):
        cs.remap(src, tmp_path / f"out{FORMATS[fmt]}", cs.Rules())
    assert _listing(tmp_path) == before


def test_failure_inside_safetensors_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = safetensors_format.write_file

    def write_file(f, items, write_data, metadata, **kwargs):  # type: ignore[no-untyped-def]
        def fail_on_third(name: str, out: object) -> int:
            if name == items[2][0]:
                raise FormatError("the data of 'x' is cut short (truncated file?)")
            return int(write_data(name, out))

        return original(f, items, fail_on_third, metadata, **kwargs)

    monkeypatch.setattr(safetensors_format, "write_file", write_file)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous contents")
    with pytest.raises(FormatError, match="cut short"):
        cs.save_state_dict(sample_state_dict(), out)
    assert out.read_bytes() == b"previous contents"
    assert _listing(tmp_path) == ["out.safetensors"]


def test_failure_inside_the_torch_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptsurgery.io.ziparchive import ZipWriter

    original = ZipWriter.add_stream

    def half_record(self: ZipWriter, name: str, *args: object, **kwargs: object) -> None:
        if "/data/" in name:
            self.f.write(b"half a record")
            raise OSError(28, "No space left on device")
        original(self, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ZipWriter, "add_stream", half_record)
    with pytest.raises(OutputError, match=r"cannot write .*No space left on device"):
        cs.save_state_dict(sample_state_dict(), tmp_path / "out.pt")
    assert _listing(tmp_path) == []


def test_failure_inside_torch_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.save still writes the dtypes the archive writer does not know (complex32 here)
    def half_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        f.write(b"PK\x03\x04 half an archive")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_save)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ComplexHalf support is experimental"
        z = torch.zeros(2, dtype=torch.complex32)
    with pytest.raises(OutputError, match=r"cannot write .*No space left on device"):
        cs.save_state_dict({"z": z}, tmp_path / "out.pt")
    assert _listing(tmp_path) == []


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """A real write error part-way: RLIMIT_FSIZE makes write(2) fail with EFBIG."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_real_write_error_part_way(tmp_path: Path, fmt: str) -> None:
    sd = {f"w{i}": torch.full((1024,), float(i)) for i in range(16)}  # 64 KiB
    out = tmp_path / f"out{FORMATS[fmt]}"
    with _file_size_limit(16 * 1024), pytest.raises(OutputError, match="cannot write"):
        cs.save_state_dict(sd, out)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_existing_output_needs_force(tmp_path: Path, fmt: str) -> None:
    src = _source(tmp_path)
    out = tmp_path / f"out{FORMATS[fmt]}"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists; pass --force"):
        cs.remap(src, out, cs.Rules())
    assert out.read_bytes() == b"keep me"
    with pytest.raises(OutputError, match="already exists"):
        cs.save_state_dict(sample_state_dict(), out, overwrite=False)
    assert out.read_bytes() == b"keep me"

    cs.remap(src, out, cs.Rules(), force=True)
    assert_bit_exact(cs.load_state_dict(out), sample_state_dict())
    assert sorted(_listing(tmp_path)) == sorted(["src.pt", out.name])


def test_existing_output_survives_a_failed_forced_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _source(tmp_path)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    _fail_after_first(monkeypatch, TorchZipCheckpoint, "write_data", RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        cs.remap(src, out, cs.Rules(), force=True)
    assert out.read_bytes() == b"keep me"
    assert _listing(tmp_path) == ["out.safetensors", "src.pt"]


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    src = _source(tmp_path)
    result = cs.remap(src, tmp_path / "out.safetensors", cs.Rules(drop=["int*"]), dry_run=True)
    assert result.written is None
    assert "int8" in result.plan.dropped
    assert _listing(tmp_path) == ["src.pt"]


def test_output_mode_follows_umask(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    cs.save_state_dict({"w": torch.ones(1)}, out)
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


# --- the output is never an input ----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_output_equal_to_source_is_refused_even_with_force(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "dir").mkdir()
    src = tmp_path / f"model{FORMATS[fmt]}"
    if fmt == "torch":
        torch.save(sample_state_dict(), src)
    else:
        cs.save_state_dict(sample_state_dict(), src)
    data = src.read_bytes()
    linked = tmp_path / f"hardlink{FORMATS[fmt]}"
    os.link(src, linked)
    symlinked = tmp_path / f"symlink{FORMATS[fmt]}"
    symlinked.symlink_to(src)
    spellings = [
        src,
        str(src),
        tmp_path / "dir" / ".." / src.name,
        f"{tmp_path}/./dir/../{src.name}",
        linked,
        symlinked,
    ]
    for out in spellings:
        with pytest.raises(OutputError, match="is the input"):
            cs.remap(src, out, cs.Rules(), force=True)
        with pytest.raises(OutputError, match="is the input"):
            cs.remap(src, out, cs.Rules(), force=True, dry_run=True)
    assert src.read_bytes() == data
    assert _listing(tmp_path) == sorted(["dir", src.name, linked.name, symlinked.name])


def test_relative_spelling_of_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dir").mkdir()
    src = tmp_path / "dir" / "model.safetensors"
    cs.save_state_dict(sample_state_dict(), src)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="is the input"):
        cs.remap("dir/model.safetensors", "./dir/../dir/model.safetensors", cs.Rules(), force=True)


# --- outputs that cannot be written ---------------------------------------------------------


@pytest.mark.parametrize("name", ["out.ckpt", "out.pth.tar", "out", "out.safetensor"])
def test_unknown_output_extension(tmp_path: Path, name: str) -> None:
    src = _source(tmp_path)
    with pytest.raises(OutputError, match=r"cannot tell the output format .*--format"):
        cs.remap(src, tmp_path / name, cs.Rules())
    with pytest.raises(OutputError, match="cannot tell the output format"):
        cs.save_state_dict(sample_state_dict(), tmp_path / name)
    with pytest.raises(OutputError, match="unknown output format 'pickle'"):
        cs.save_state_dict(sample_state_dict(), tmp_path / name, format="pickle")
    assert _listing(tmp_path) == ["src.pt"]


@pytest.mark.parametrize("name", ["out.PT", "out.Safetensors", "out.BIN", "out.pth"])
def test_output_extension_any_case(tmp_path: Path, name: str) -> None:
    cs.save_state_dict({"w": torch.ones(1)}, tmp_path / name)
    assert_bit_exact(cs.load_state_dict(tmp_path / name), {"w": torch.ones(1)})


def test_output_folder_missing(tmp_path: Path) -> None:
    src = _source(tmp_path)
    with pytest.raises(OutputError, match=r"output folder .*no_such_dir' does not exist"):
        cs.remap(src, tmp_path / "no_such_dir" / "out.safetensors", cs.Rules())
    with pytest.raises(OutputError, match="does not exist"):
        cs.save_state_dict({"w": torch.ones(1)}, tmp_path / "no_such_dir" / "out.pt")


def test_output_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "out.pt").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        cs.save_state_dict({"w": torch.ones(1)}, tmp_path / "out.pt")


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root: permission bits do not stop root from writing to a folder",
)
def test_read_only_output_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="is not writable"):
            cs.save_state_dict({"w": torch.ones(1)}, folder / "out.safetensors")
        assert _listing(folder) == []
    finally:
        folder.chmod(0o755)


def test_unstorable_dtype_in_safetensors(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    with pytest.raises(
        OutputError, match=r"dtype complex128, which safetensors cannot store.*--format torch"
    ):
        cs.save_state_dict({"z": torch.zeros(2, dtype=torch.complex128)}, out)
    assert _listing(tmp_path) == []
    cs.save_state_dict({"z": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "out.pt")


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_output_that_appears_while_writing_is_not_clobbered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    src = _source(tmp_path)
    out = tmp_path / f"out{FORMATS[fmt]}"
    original = getattr(TorchZipCheckpoint, FETCH[fmt])

    def fetch(self: TorchZipCheckpoint, name: str, *rest: object) -> object:
        if not out.exists():
            out.write_bytes(b"another run got here first")
        return original(self, name, *rest)

    monkeypatch.setattr(TorchZipCheckpoint, FETCH[fmt], fetch)
    with pytest.raises(OutputError, match="appeared while it was being written; pass --force"):
        cs.remap(src, out, cs.Rules())
    assert out.read_bytes() == b"another run got here first"
    assert _listing(tmp_path) == sorted([out.name, "src.pt"])

    out.unlink()
    cs.remap(src, out, cs.Rules(), force=True)  # forced: the late arrival is replaced
    assert_bit_exact(cs.load_state_dict(out), sample_state_dict())


def test_early_writeback_flushes_while_writing_and_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper thread flushes a growing file to the disk as it goes, and is gone after."""
    import threading
    import time

    from ckptsurgery.io import atomic

    monkeypatch.setattr(atomic, "_WRITEBACK_STEP", 1024)
    monkeypatch.setattr(atomic, "_WRITEBACK_POLL", 0.005)
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    out = tmp_path / "out.bin"
    chunks = [bytes([i]) * 4096 for i in range(20)]
    with atomic.atomic_write(out) as f:
        for chunk in chunks:
            f.write(chunk)
            f.flush()
            time.sleep(0.01)
    assert out.read_bytes() == b"".join(chunks)
    assert synced  # flushed part-way, not only at the end
    assert not [t for t in threading.enumerate() if t.name == "writeback"]
