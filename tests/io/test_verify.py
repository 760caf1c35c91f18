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
    (no tensor byte is hashed a second time)."""
    from ckptsurgery.io.safetensors_format import SafetensorsCheckpoint
    from ckptsurgery.io.torchzip import TorchZipCheckpoint

    src = _source(tmp_path, "safetensors")
    hashed_late: list[str] = []
    for cls in (SafetensorsCheckpoint, TorchZipCheckpoint):
        original = cls.data_crcs

        def spy(self, names, original=original):  # type: ignore[no-untyped-def]
            names = list(names)
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
