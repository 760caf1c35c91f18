"""After writing, the output is read back and checked before it takes its name.

Each tensor's bytes are read back from the output and hashed right after they are written
(a helper thread trailing the copy); the finished temporary file (or folder) is then re-opened
and checked: names, shapes, dtypes, ties, every tensor lying where it was hashed, and those
CRC-32s equal to the ones kept while writing. Damage found leaves no output and a previous
output as it was. ``--no-verify`` skips all of it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import Result
from conftest import assert_bit_exact, cli_run, sample_state_dict

import ckptsurgery as cs
from ckptsurgery.errors import OutputError
from ckptsurgery.io import verify, writer
from ckptsurgery.io.dtypes import TensorInfo
from ckptsurgery.io.sharded import read_index
from ckptsurgery.io.verify import Expected, verify_written
from ckptsurgery.io.ziparchive import ZipArchive

OUTPUTS = {
    "safetensors": ["out.safetensors"],
    "torch": ["out.pt"],
    "sharded": ["shards", "--max-shard-size", "100"],
}


def _source(tmp_path: Path, fmt: str) -> Path:
    sd = {f"module.{k}": v for k, v in sample_state_dict().items()}
    src = tmp_path / ("src.pt" if fmt == "torch" else "src.safetensors")
    if fmt == "torch":
        torch.save(sd, src)
    else:
        cs.save_state_dict(sd, src)
    return src


def _flip_a_tensor_byte(path: Path) -> None:
    """Damage one byte of tensor data in the written file (the last shard of a folder)."""
    if path.name.endswith(".index.json"):
        path = path.parent / sorted(set(read_index(path).values()))[-1]
    data = bytearray(path.read_bytes())
    if data.startswith(b"PK"):
        with open(path, "rb") as f:
            zf = ZipArchive(f, base=0, length=len(data), source=str(path))
            name = next(n for n in zf.records if "/data/" in n and zf.records[n].size)
            at = zf.data_offset(name)
    else:
        at = len(data) - 1  # safetensors: the last byte of the data section
    data[at] ^= 0x01
    path.write_bytes(data)


def _damaging(calls: list[Path]) -> Callable[..., None]:
    """A final check that first damages the finished file (the shards' path: they are
    hashed there, not while written)."""

    def damage_then_verify(path: Path, expected: Expected, **kwargs: object) -> None:
        calls.append(path)
        _flip_a_tensor_byte(path)
        verify_written(path, expected, **kwargs)  # type: ignore[arg-type]

    return damage_then_verify


def _damaging_read_back(calls: list[list[verify.Span]]) -> Callable[..., dict[str, int]]:
    """A read-back that first flips a byte of the first range holding any: the file damaged
    after the tensor was written, before it was read back."""
    original = verify.read_back

    def damage_then_read(fd: int, spans: list[verify.Span], what: str) -> dict[str, int]:
        with_bytes = [s for s in spans if s[2]]
        if with_bytes and not any(s[2] for batch in calls for s in batch):
            _, begin, _ = with_bytes[0]
            os.pwrite(fd, bytes([os.pread(fd, 1, begin)[0] ^ 0x01]), begin)
        calls.append(spans)
        return original(fd, spans, what)

    return damage_then_read


def _inject_flip(monkeypatch: pytest.MonkeyPatch, out_kind: str) -> list[object]:
    """Flip a tensor byte between its write and its check: before the read-back of a single
    file, before the final check of shards. Returns the calls seen."""
    calls: list[object] = []
    if out_kind == "sharded":
        monkeypatch.setattr(writer, "verify_output", _damaging(calls))  # type: ignore[arg-type]
    else:
        monkeypatch.setattr(verify, "read_back", _damaging_read_back(calls))  # type: ignore[arg-type]
    return calls


def _truncating(calls: list[Path]) -> Callable[..., None]:
    """A final check that first cuts the finished file (the last shard of a folder) short."""

    def truncate_then_verify(path: Path, expected: Expected, **kwargs: object) -> None:
        calls.append(path)
        target = path
        if path.name.endswith(".index.json"):
            target = path.parent / sorted(set(read_index(path).values()))[-1]
        os.truncate(target, target.stat().st_size - 100)
        verify_written(path, expected, **kwargs)  # type: ignore[arg-type]

    return truncate_then_verify


def _fingerprint(p: Path) -> dict[str, str]:
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def _rewrite_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, src_fmt: str, out_kind: str,
    inject: Callable[[], list[object]],
) -> str:  # fmt: skip
    """Write once, then rewrite with ``inject`` damaging the new output: the rewrite must be
    refused with one ``Error:`` line, the previous output intact, no temporary file left.
    Returns that line."""
    src = _source(tmp_path, src_fmt)
    out_args = OUTPUTS[out_kind]
    out = tmp_path / out_args[0]
    argv = ["remap", str(src), "-o", str(out), *out_args[1:], "--strip-prefix", "module."]
    first = cli_run(*argv)
    assert first.exit_code == 0, first.stderr
    previous = _fingerprint(out)
    listing = sorted(p.name for p in tmp_path.iterdir())

    calls = inject()
    result = cli_run(*argv, "--force", "--add-prefix", "new.")

    assert calls
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = _error_lines(result)
    assert len(errors) == 1, result.stderr
    assert f"verifying {str(out)!r} after writing it failed" in errors[0]
    assert "nothing was written" in errors[0]
    assert _fingerprint(out) == previous  # the previous output, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no temporary file left
    return errors[0]


@pytest.mark.parametrize("src_fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("out_kind", list(OUTPUTS))
def test_damage_between_write_and_verify_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, src_fmt: str, out_kind: str
) -> None:
    error = _rewrite_refused(
        tmp_path, monkeypatch, src_fmt, out_kind, lambda: _inject_flip(monkeypatch, out_kind)
    )
    assert "CRC-32" in error


@pytest.mark.parametrize("src_fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("out_kind", list(OUTPUTS))
def test_truncated_output_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, src_fmt: str, out_kind: str
) -> None:
    def inject() -> list[object]:
        calls: list[object] = []
        monkeypatch.setattr(writer, "verify_output", _truncating(calls))  # type: ignore[arg-type]
        return calls

    _rewrite_refused(tmp_path, monkeypatch, src_fmt, out_kind, inject)


@pytest.mark.parametrize("out_kind", ["safetensors", "torch"])
def test_the_final_check_does_not_hash_again_what_was_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out_kind: str
) -> None:
    """The read-back trails the copy: once the file is complete, only its structure is read
    (no tensor byte of the output is hashed a second time)."""
    from ckptsurgery.io.safetensors_format import SafetensorsCheckpoint
    from ckptsurgery.io.torchzip import TorchZipCheckpoint

    src = _source(tmp_path, "safetensors")
    hashed_late: list[str] = []
    for cls in (SafetensorsCheckpoint, TorchZipCheckpoint):
        original = cls.data_crcs

        def spy(self, names, original=original):  # type: ignore[no-untyped-def]
            names = list(names)
            if self.path != src:  # the source's own bytes may be hashed in place
                hashed_late.extend(names)
            return original(self, names)

        monkeypatch.setattr(cls, "data_crcs", spy)
    read: list[list[verify.Span]] = []
    original_read_back = verify.read_back

    def counting(fd: int, spans: list[verify.Span], what: str) -> dict[str, int]:
        read.append(spans)
        return original_read_back(fd, spans, what)

    monkeypatch.setattr(verify, "read_back", counting)
    out = tmp_path / OUTPUTS[out_kind][0]
    assert cli_run("remap", src, "-o", out, "--strip-prefix", "module.").exit_code == 0
    from ckptsurgery.io.reader import open_checkpoint

    with open_checkpoint(out) as ckpt:
        stored = {name for name in ckpt.infos if ckpt.canonical(name) == name}
    assert {name for batch in read for name, _, _ in batch} == stored  # every stored tensor
    assert hashed_late == []


@pytest.mark.parametrize("out_kind", list(OUTPUTS))
def test_damage_leaves_no_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out_kind: str
) -> None:
    src = _source(tmp_path, "torch")
    out_args = OUTPUTS[out_kind]
    _inject_flip(monkeypatch, out_kind)
    result = cli_run("remap", src, "-o", tmp_path / out_args[0], *out_args[1:])
    assert result.exit_code == 2, result.stderr
    assert len(_error_lines(result)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


def _remap(src: Path, out: Path) -> list[str]:
    return ["remap", str(src), "-o", str(out)]


def _merge(src: Path, out: Path) -> list[str]:
    return ["merge", str(src), "-o", str(out)]


def _apply(src: Path, out: Path) -> list[str]:
    recipe = src.parent / "recipe.toml"
    recipe.write_text(f'[[source]]\npath = "{src.name}"\n[output]\npath = "{out.name}"\n')
    return ["apply", str(recipe)]


@pytest.mark.parametrize("command", [_remap, _merge, _apply], ids=["remap", "merge", "apply"])
def test_every_writing_command_verifies_unless_told_not_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: Callable[[Path, Path], list[str]]
) -> None:
    src = _source(tmp_path, "safetensors")
    out = tmp_path / "out.safetensors"
    calls = _inject_flip(monkeypatch, "safetensors")

    skipped = cli_run(*command(src, out), "--no-verify")
    assert skipped.exit_code == 0, skipped.stderr
    assert calls == []  # the damage would have been found: nothing looked
    out.unlink()

    checked = cli_run(*command(src, out))
    assert calls
    assert checked.exit_code == 2, checked.stderr
    assert "CRC-32" in _error_lines(checked)[0]
    assert not out.exists()


def test_verified_outputs_read_back(tmp_path: Path) -> None:
    """Without damage every output passes its own check (ties, views and odd dtypes too)."""
    sd = sample_state_dict()
    for name in ("out.safetensors", "out.pt"):
        written = cs.save_state_dict(sd, tmp_path / name)
        assert written.path.exists()
        assert_bit_exact(cs.load_state_dict(tmp_path / name), sd)


def test_library_verify_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _inject_flip(monkeypatch, "safetensors")
    cs.save_state_dict(sample_state_dict(), tmp_path / "a.safetensors", verify=False)
    assert calls == []
    with pytest.raises(OutputError, match="CRC-32"):
        cs.save_state_dict(sample_state_dict(), tmp_path / "b.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_verify_names_shapes_dtypes_and_ties(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    a, b = torch.ones(2, 3), torch.arange(4, dtype=torch.int64)
    cs.save_state_dict({"a": a, "b": b, "tied": a}, path)
    infos = {"a": TensorInfo((2, 3), "float32", 24), "b": TensorInfo((4,), "int64", 32)}
    infos["tied"] = infos["a"]
    good = Expected(dict(infos), {"tied": "a"})
    verify_written(path, good, out=path)

    def refused(expected: Expected, match: str) -> None:
        with pytest.raises(OutputError, match=match):
            verify_written(path, expected, out=tmp_path / "OUT")

    refused(Expected({**infos, "c": infos["b"]}, {"tied": "a"}), "tensor 'c' is missing")
    refused(Expected({"a": infos["a"], "tied": infos["a"]}, {"tied": "a"}), "extra 'b'")
    wrong_shape = {**infos, "b": TensorInfo((2, 2), "int64", 32)}
    refused(Expected(wrong_shape, {"tied": "a"}), r"'b' reads back as int64 \[4\]")
    wrong_dtype = {**infos, "b": TensorInfo((4,), "float64", 32)}
    refused(Expected(wrong_dtype, {"tied": "a"}), "int64 .* float64")
    refused(Expected(dict(infos), {}), "'tied' does not read back tied to 'tied'")
    refused(Expected(dict(infos), {"tied": "a"}, {"a": 1}), "'a' read back with CRC-32")
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(OutputError, match="does not read back"):
        verify_written(tmp_path / "bad.safetensors", good, out=tmp_path / "OUT")


def test_crcs_of_spans(tmp_path: Path) -> None:
    """Small ranges share reads, big ones are mapped; the result is zlib's either way."""
    import zlib

    from ckptsurgery.errors import FormatError
    from ckptsurgery.io.streams import crcs_of_spans

    data = bytes(range(256)) * (40 * 1024 * 4)  # 40 MiB
    path = tmp_path / "blob"
    path.write_bytes(data)
    mib = 1024 * 1024
    spans = [
        ("big", 1, 20 * mib),
        ("empty", 5, 0),
        ("small", 30 * mib, 100),
        ("tail", 39 * mib, mib),
    ]
    with open(path, "rb") as f:
        got = crcs_of_spans(f, reversed(spans), what="blob")
        assert got == {n: zlib.crc32(data[b : b + k]) for n, b, k in spans}
        with pytest.raises(FormatError, match="'past' is cut short"):
            crcs_of_spans(f, [("past", 40 * mib - 10, 20)], what="blob")


# --- a torch source's record checks, when verifying ---------------------------------------


def _record_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The records a torch source hashes to check them against their CRC-32 (a list that
    fills as they are hashed)."""
    from ckptsurgery.io import torchzip

    seen: list[str] = []
    original = torchzip.crc_of_range

    def counting(f: object, begin: int, length: int, *, what: str) -> int:
        seen.append(what)
        return original(f, begin, length, what=what)  # type: ignore[arg-type]

    monkeypatch.setattr(torchzip, "crc_of_range", counting)
    return seen


def _whole_records_source(tmp_path: Path) -> Path:
    """A torch file whose tensors each fill their storage record (views are checked as they
    are read, whatever the writer does), one of them tied."""
    weight = torch.randn(6, 4)
    sd = {"a.weight": weight, "a.bias": torch.randn(6), "b": torch.arange(5), "tied": weight}
    torch.save(sd, tmp_path / "src.pt")
    return tmp_path / "src.pt"


def _write_all(ckpt: object, out: Path, out_kind: str, *, verify: bool) -> None:
    from ckptsurgery.io import Checkpoint, write_checkpoint

    assert isinstance(ckpt, Checkpoint)
    names = [(name, name) for name in ckpt.infos]
    shards = 100 if out_kind == "sharded" else None
    fmt = "torch" if out_kind == "torch" else "safetensors"
    write_checkpoint(out, ckpt, names, fmt=fmt, verify=verify, max_shard_size=shards)


@pytest.mark.parametrize("out_kind", list(OUTPUTS))
def test_verifying_hashes_a_torch_record_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out_kind: str
) -> None:
    """Verifying, a record copied whole keeps its archive's CRC-32, and the output's bytes
    are compared with it: that checks the source's bytes too, so the source does not hash
    them again. Without verification the source checks them itself, once."""
    from ckptsurgery.io import open_checkpoint

    src = _whole_records_source(tmp_path)
    seen = _record_checks(monkeypatch)
    with open_checkpoint(src) as ckpt:
        stored = {ckpt.canonical(name) for name in ckpt.infos}
        _write_all(ckpt, tmp_path / OUTPUTS[out_kind][0], out_kind, verify=True)
        assert seen == []
        # the output's check settled them: writing again does not hash them either
        _write_all(ckpt, tmp_path / f"again-{OUTPUTS[out_kind][0]}", out_kind, verify=False)
        assert seen == []
    with open_checkpoint(src) as ckpt:
        _write_all(ckpt, tmp_path / f"unverified-{OUTPUTS[out_kind][0]}", out_kind, verify=False)
    assert len(seen) == len(set(seen)) == len(stored)  # each record once, by the source


def test_a_failed_verification_checks_the_source_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the output's bytes do not match a record's CRC-32, the source's own check runs:
    damage in the output is reported as a failed write, and the records are checked."""
    from ckptsurgery.io import open_checkpoint

    src = _whole_records_source(tmp_path)
    seen = _record_checks(monkeypatch)
    _inject_flip(monkeypatch, "torch")
    with open_checkpoint(src) as ckpt:
        stored = {ckpt.canonical(name) for name in ckpt.infos}
        with pytest.raises(OutputError, match="CRC-32"):
            _write_all(ckpt, tmp_path / "out.pt", "torch", verify=True)
        assert len(seen) == len(stored)  # the source was checked, and found intact
    assert not (tmp_path / "out.pt").exists()


def test_an_interrupted_write_hands_the_record_checks_back(tmp_path: Path) -> None:
    """A write stopped half-way proves nothing about the records it held back: the next
    write from the same source checks them again, and finds a record damaged since."""
    from ckptsurgery.errors import FormatError
    from ckptsurgery.io import open_checkpoint, write_checkpoint

    src = _source(tmp_path, "torch")

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with open_checkpoint(src) as ckpt:
        names = [(name, name) for name in ckpt.infos]
        with pytest.raises(KeyboardInterrupt):
            write_checkpoint(tmp_path / "a.pt", ckpt, names, fmt="torch", progress=stop)
        _flip_a_tensor_byte(src)  # the source damaged after the first try
        with pytest.raises(FormatError, match="fails its CRC-32 check"):
            write_checkpoint(tmp_path / "b.pt", ckpt, names, fmt="torch", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pt"]


@pytest.mark.parametrize("verify_output", [True, False])
def test_a_corrupt_torch_record_is_named_either_way(tmp_path: Path, verify_output: bool) -> None:
    """Held back or not, a corrupt source record is reported as the source's fault."""
    from ckptsurgery.errors import FormatError

    src = _source(tmp_path, "torch")
    _flip_a_tensor_byte(src)
    for out in ("out.pt", "out.safetensors"):
        with pytest.raises(FormatError, match=r"fails its CRC-32 check.*corrupt"):
            cs.remap(src, tmp_path / out, cs.Rules(), verify=verify_output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pt"]


def test_helper_threads_yield_the_cores() -> None:
    """The read-back runs at a lower priority than the copy it trails (Linux: per thread)."""
    import sys
    import threading

    from ckptsurgery.io.streams import HELPER_NICE, lower_priority

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread priorities are Linux's")
    got: list[int] = []

    def run() -> None:
        before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        lower_priority()
        got.extend([before, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())])

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert got[1] == min(19, got[0] + HELPER_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == got[0]  # not ours


@pytest.mark.parametrize("lag", [0, 150_000, None], ids=["trailing", "half", "at-the-end"])
@pytest.mark.parametrize("two_threads", [False, True])
def test_read_back_trails_the_copy_or_hashes_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lag: int | None, two_threads: bool
) -> None:
    """Whether the read-back hashes a range as soon as the copy is ``lag`` bytes past it or
    leaves it for the final fsync (on two threads), each range gets the CRC-32 of its bytes
    in the file."""
    import threading
    import zlib

    if two_threads:
        monkeypatch.setattr(verify, "_PARALLEL_BYTES", 0)
    hashed_early = threading.Event()
    original = verify.read_back

    def noting(fd: int, spans: list[verify.Span], what: str) -> dict[str, int]:
        hashed_early.set()
        return original(fd, spans, what)

    monkeypatch.setattr(verify, "read_back", noting)
    data = os.urandom(300_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    spans = [("a", 0, 1000), ("b", 1000, 200_000), ("c", 201_000, 0), ("d", 201_000, 99_000)]
    with open(path, "rb") as f:
        rb = verify.ReadBack(f.fileno(), what="f", lag=lag)
        for span in spans:
            rb.written(*span)
        if lag == 0:  # trailing: hashed before the copy is over
            assert hashed_early.wait(10)
        rb.finish()
        got = rb.result()
    assert got == {n: (b, k, zlib.crc32(data[b : b + k])) for n, b, k in spans}


def test_read_back_lag_is_bounded_by_memory() -> None:
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < verify.read_back_lag() <= min(4 << 30, memory // 8)


def test_a_trailing_read_back_finds_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "read_back_lag", lambda: 0)
    error = _rewrite_refused(
        tmp_path, monkeypatch, "safetensors", "safetensors",
        lambda: _inject_flip(monkeypatch, "safetensors"),
    )  # fmt: skip
    assert "CRC-32" in error


def _digest_waits_for_the_tap(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Start each source digest's pass only once the writer has tapped it (in a real write
    it starts at once, and may be past a few tensors by then, or done with a small file):
    every tensor copied is then hashed by that pass. Returns how many names each tap got."""
    import threading

    from ckptsurgery.io import safetensors_format, streams

    tapped = threading.Event()
    counts: list[int] = []
    original_tap = safetensors_format.tap_digest
    original_run = streams.FileDigest._run

    def tap(f: object, spans: object) -> dict[str, Callable[[], int]]:
        got = original_tap(f, spans)  # type: ignore[arg-type]
        counts.append(len(got))
        tapped.set()
        return got

    def run(self: streams.FileDigest) -> None:
        tapped.wait(10)
        tapped.clear()
        original_run(self)

    monkeypatch.setattr(safetensors_format, "tap_digest", tap)
    monkeypatch.setattr(streams.FileDigest, "_run", run)
    return counts


@pytest.mark.parametrize("out_kind", ["safetensors", "sharded"])
def test_a_safetensors_copy_is_hashed_by_the_source_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out_kind: str
) -> None:
    """Verifying a copy from a safetensors file, the CRC-32s the output is compared with come
    from the pass that makes the source's digest for the provenance: the copy itself hashes
    nothing on its way, and the output is verified and bit-exact."""
    from ckptsurgery.io import streams

    counts = _digest_waits_for_the_tap(monkeypatch)
    made: list[object] = []

    class Counting(streams.CrcWriter):
        def __init__(self, f: object) -> None:
            made.append(f)
            super().__init__(f)  # type: ignore[arg-type]

    src = _source(tmp_path, "safetensors")
    monkeypatch.setattr(writer, "CrcWriter", Counting)
    out = tmp_path / OUTPUTS[out_kind][0]
    result = cli_run("remap", src, "-o", out, *OUTPUTS[out_kind][1:], "--strip-prefix", "module.")
    assert result.exit_code == 0, result.stderr
    with cs.open_checkpoint(src) as ckpt:
        stored = len({ckpt.canonical(name) for name in ckpt.infos})
    assert counts == [stored] and made == []
    got = cs.load_state_dict(out)
    want = {k.removeprefix("module."): v for k, v in cs.load_state_dict(src).items()}
    assert_bit_exact(got, want, ordered=False)


def test_damage_is_found_against_the_tapped_checksums(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte flipped in the output between its write and its read-back is refused when the
    expected CRC-32s came from the source's digest pass."""

    taps: list[list[int]] = []

    def inject() -> list[object]:
        taps.append(_digest_waits_for_the_tap(monkeypatch))
        return _inject_flip(monkeypatch, "safetensors")

    error = _rewrite_refused(tmp_path, monkeypatch, "safetensors", "safetensors", inject)
    assert "CRC-32" in error
    assert taps[0] and all(taps[0])  # the checksums compared came from the source's digest
