"""The read-ahead of a computed output's inputs: one tensor ahead of the caller, in the order
the writer announced, on a helper thread; anything else falls back to reading directly."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptsurgery as cs
from ckptsurgery.plan.execute import PlanSource, ReadAhead


def _jobs(n: int, log: list[tuple[str, int]]) -> list[tuple[object, object]]:
    def fetch(i: int) -> torch.Tensor:
        log.append((threading.current_thread().name, i))
        return torch.full((4,), float(i))

    return [(("t", i), lambda i=i: fetch(i)) for i in range(n)]


def test_one_ahead_in_order_on_a_helper_thread() -> None:
    log: list[tuple[str, int]] = []
    ahead = ReadAhead(_jobs(5, log))  # type: ignore[arg-type]
    for i in range(5):
        got = ahead.take(("t", i), lambda: pytest.fail("fetched directly"))  # type: ignore[arg-type, return-value]
        assert got.tolist() == [float(i)] * 4
        assert len(log) <= i + 2  # never more than one input held ahead
    ahead.stop()
    assert [i for _, i in log] == list(range(5))
    assert {name for name, _ in log} == {"read-ahead"}


def test_out_of_order_falls_back_and_stops() -> None:
    log: list[tuple[str, int]] = []
    ahead = ReadAhead(_jobs(5, log))  # type: ignore[arg-type]
    assert ahead.take(("t", 0), lambda: torch.zeros(1)).tolist() == [0.0] * 4
    direct = ahead.take(("t", 3), lambda: torch.ones(2))
    assert direct.tolist() == [1.0, 1.0]  # not the read-ahead's
    assert ahead.take(("t", 1), lambda: torch.ones(3)).tolist() == [1.0] * 3  # stopped
    assert len(log) <= 2


def test_a_failed_fetch_is_raised_to_the_caller() -> None:
    def boom() -> torch.Tensor:
        raise cs.CheckpointError("the data of 'x' is cut short")

    ahead = ReadAhead([(("t", 0), boom)])
    with pytest.raises(cs.CheckpointError, match="cut short"):
        ahead.take(("t", 0), boom)
    ahead.stop()


def test_average_reads_ahead_and_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """merge --average reads its inputs on the helper thread, and the result is the mean."""
    paths = []
    g = torch.Generator().manual_seed(0)
    for r in range(3):
        paths.append(tmp_path / f"run{r}.safetensors")
        sd = {f"w{i}": torch.randn(100 + i, generator=g) for i in range(8)}
        sd["steps"] = torch.tensor([r])
        save_file(sd, paths[-1])
    threads: list[str] = []
    original = PlanSource._view

    def spy(self: PlanSource, i: int, key: str) -> bytes | memoryview:
        threads.append(threading.current_thread().name)
        return original(self, i, key)

    monkeypatch.setattr(PlanSource, "_view", spy)
    out = tmp_path / "soup.safetensors"
    cs.average_files(paths, out)
    assert threads and set(threads) == {"read-ahead"}
    got = load_file(out)
    inputs = [load_file(p) for p in paths]
    for i in range(8):
        want = sum(torch.mul(inputs[j][f"w{i}"], 1 / 3) for j in range(3))
        assert torch.equal(got[f"w{i}"], want)  # each product rounded, then summed in order
    assert got["steps"].tolist() == [0]


def test_computing_leaves_one_core_to_the_helpers_and_restores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a mean computed with torch is written torch computes on one thread fewer (at
    least one), and the collector skips what was alive before; both are restored afterwards."""
    import gc
    import os

    from ckptsurgery.plan import execute as execute_module

    paths = []
    for r in range(2):  # a complex mean is computed with torch (numpy sums real floats)
        paths.append(tmp_path / f"run{r}.safetensors")
        save_file({"w": torch.full((8,), complex(r, 1), dtype=torch.complex64)}, paths[-1])
    seen: list[tuple[int, int]] = []
    original = execute_module.write_checkpoint

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((torch.get_num_threads(), gc.get_freeze_count()))
        return original(*args, **kwargs)

    monkeypatch.setattr(execute_module, "write_checkpoint", spy)
    before = torch.get_num_threads()
    frozen = gc.get_freeze_count()
    cs.average_files(paths, tmp_path / "soup.safetensors")
    cores = len(os.sched_getaffinity(0))
    assert seen == [(max(1, min(before, cores - 1)), seen[0][1])]
    assert seen[0][1] > frozen  # the objects alive before were frozen during the write
    assert torch.get_num_threads() == before
    assert gc.get_freeze_count() == frozen


def test_a_mean_reads_big_inputs_as_read_only_maps(tmp_path: Path) -> None:
    """A big safetensors tensor is handed to a mean as a map of the file (not a copy), equal
    to the tensor; small ones are read; a file cut short is an error, not a crash."""
    import os

    from ckptsurgery.io.reader import open_checkpoint

    big = torch.randn(512, 1024)  # 2 MiB
    path = tmp_path / "a.safetensors"
    save_file({"big": big, "small": torch.ones(3)}, path)
    with open_checkpoint(path) as ckpt:
        view = ckpt.tensor_view("big")
        assert torch.equal(view, big)
        assert torch.equal(ckpt.tensor_view("small"), torch.ones(3))
    assert torch.equal(view, big)  # still valid after close
    with open_checkpoint(path) as ckpt:
        os.truncate(path, path.stat().st_size // 2)  # cut short after the header was read
        with pytest.raises(cs.CheckpointError, match="cut short"):
            ckpt.tensor_view("big")


def test_the_read_ahead_and_the_copies_take_turns_with_a_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A torch archive's reader moves its file's position (it locates a record's data on
    first use): while the writer copies one tensor, the read-ahead thread making the next
    one must not move it under the copy. Widened here: locating a record first seeks to 0
    again and again."""
    import time

    from ckptsurgery.io.ziparchive import ZipArchive

    g = torch.Generator().manual_seed(0)
    sd = {f"t{i:02d}.weight": torch.randn(1024, 1024, generator=g) for i in range(12)}
    src = tmp_path / "src.pth"
    torch.save(sd, src)
    original = ZipArchive.data_offset

    def slow_data_offset(self: ZipArchive, name: str) -> int:
        if name not in self._data_offsets:
            for _ in range(50):  # moves the position again and again, as a copy may be under way
                self.f.seek(0)
                time.sleep(0.0002)
        return original(self, name)

    monkeypatch.setattr(ZipArchive, "data_offset", slow_data_offset)
    out = tmp_path / "out.safetensors"
    cs.remap(src, out, cs.Rules(), adapters=[cs.Rows("t?[02468].weight", range(8))])
    got = load_file(out)
    for name, t in sd.items():
        want = t[:8] if int(name[1:3]) % 2 == 0 else t
        assert torch.equal(got[name], want), name
