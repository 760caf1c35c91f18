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
