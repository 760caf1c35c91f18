"""Checksums: isal's CRC-32 equals zlib's bit for bit, xxh3-128 names itself in the
provenance, and both fall back to the standard library when their package is missing."""

from __future__ import annotations

import builtins
import hashlib
import importlib
import os
import zlib
from typing import Any

import pytest

from ckptsurgery.io import checksums


@pytest.mark.parametrize("size", [0, 1, 7, 4096, 1 << 20, (1 << 20) + 3])
def test_crc32_equals_zlib_and_continues(size: int) -> None:
    data = os.urandom(size)
    assert checksums.crc32(data) == zlib.crc32(data)
    half = size // 2
    assert checksums.crc32(data[half:], checksums.crc32(data[:half])) == zlib.crc32(data)
    assert checksums.crc32(memoryview(data)) == zlib.crc32(data)


def test_the_fast_libraries_are_used_when_installed() -> None:
    pytest.importorskip("isal")
    pytest.importorskip("xxhash")
    from isal import isal_zlib

    assert checksums.crc32 is isal_zlib.crc32
    assert checksums.DIGEST == "xxh3_128"
    h = checksums.new_digest()
    h.update(b"abc")
    import xxhash

    assert h.hexdigest() == xxhash.xxh3_128_hexdigest(b"abc")


def test_without_isal_and_xxhash_zlib_and_sha256(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_fast(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in ("isal", "xxhash"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fast)
    try:
        fallback = importlib.reload(checksums)
        assert fallback.crc32 is zlib.crc32
        assert fallback.DIGEST == "sha256"
        h = fallback.new_digest()
        h.update(b"abc")
        assert h.hexdigest() == hashlib.sha256(b"abc").hexdigest()
    finally:
        monkeypatch.undo()
        importlib.reload(checksums)


def test_hashing_helpers_take_turns(tmp_path: Any) -> None:
    """The source's digest, its record checks and the read-back hash one at a time beside a
    copy: a digest started while another helper hashes waits for its turn, then completes."""
    import threading
    import time

    from ckptsurgery.io.streams import FileDigest, helper_turn, in_background

    data = os.urandom(1 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    ran: list[str] = []
    with helper_turn():
        digest = FileDigest(path)
        join = in_background([lambda: ran.append("check")])
        time.sleep(0.2)
        assert digest._thread.is_alive() and ran == []  # both wait for the turn
        assert threading.active_count() >= 3
    join()
    assert ran == ["check"]
    expected = checksums.new_digest()
    expected.update(data)
    assert digest.hexdigest() == expected.hexdigest()


def _digest_held_after_first_window(monkeypatch: Any) -> Any:
    """A FileDigest pass that stops after its first window until the returned event is set."""
    import threading

    from ckptsurgery.io import streams

    go = threading.Event()
    original = streams.FileDigest._update
    seen = [0]

    def update(self: Any, h: Any, view: memoryview) -> None:
        if seen[0] == 1:
            assert go.wait(10)
        seen[0] += 1
        original(self, h, view)

    monkeypatch.setattr(streams.FileDigest, "_update", update)
    return go


def test_a_digest_pass_hashes_the_ranges_a_writer_taps(tmp_path: Any, monkeypatch: Any) -> None:
    """A writer taps the digest pass over its source for the CRC-32s of tensor ranges: it
    gets those the pass has not reached yet (across windows, empty ones too), none it has
    passed, and none once the pass is over; the digest itself is unchanged."""
    from ckptsurgery.io import streams

    monkeypatch.setattr(streams, "_WINDOW", 64 * 1024)
    data = os.urandom(5 * 64 * 1024 + 123)
    path = tmp_path / "f"
    path.write_bytes(data)
    go = _digest_held_after_first_window(monkeypatch)
    spans = [
        ("passed", 10, 1000),  # inside the first window, hashed before the tap
        ("cut", 60_000, 10_000),  # begun in the first window
        ("across", 70_000, 200_000),
        ("empty", 270_000, 0),
        ("next", 270_000, 50_000),
        ("tail", len(data) - 5, 5),
    ]
    digest = streams.FileDigest(path)
    import time

    deadline = time.monotonic() + 10
    while digest._pos < 64 * 1024 and time.monotonic() < deadline:  # the first window taken
        time.sleep(0.01)
    with open(path, "rb") as f:
        tapped = streams.tap_digest(f, spans)
    assert sorted(tapped) == ["across", "empty", "next", "tail"]
    go.set()
    got = {name: crc() for name, crc in tapped.items()}
    assert got == {n: zlib.crc32(data[b : b + k]) for n, b, k in spans if n in tapped}
    expected = checksums.new_digest()
    expected.update(data)
    assert digest.hexdigest() == expected.hexdigest()
    assert digest.tap(spans) == {}  # the pass is over
    with open(tmp_path / "other", "wb+") as f:  # no pass over this file
        assert streams.tap_digest(f, spans) == {}


def test_a_tapped_range_past_the_end_is_cut_short(tmp_path: Any) -> None:
    from ckptsurgery.errors import FormatError
    from ckptsurgery.io.streams import FileDigest, helper_turn

    path = tmp_path / "f"
    path.write_bytes(os.urandom(1000))
    with helper_turn():  # the pass waits for its turn: nothing is passed yet
        digest = FileDigest(path)
        tapped = digest.tap([("whole", 0, 1000), ("beyond", 900, 200)])
    assert tapped["whole"]() == zlib.crc32(path.read_bytes())
    with pytest.raises(FormatError, match="'beyond' is cut short"):
        tapped["beyond"]()
