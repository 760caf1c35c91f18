"""The safetensors header parser against the safetensors library itself.

Generated valid and near-valid files (fixed seeds): every file the ``safetensors`` library
accepts, ckptsurgery accepts with the same names, dtypes, shapes and tensor bytes (so the
same offsets), and every file the library refuses, ckptsurgery refuses too -- except where
ckptsurgery is deliberately stricter, each case listed in ``STRICTER`` with its reason (and in
the README's "Fuzzing" section).
"""

from __future__ import annotations

import io
import json
import random
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from safetensors._safetensors_rust import SafetensorError, deserialize

from ckptsurgery.errors import FormatError
from ckptsurgery.io.dtypes import SAFETENSORS_DTYPES
from ckptsurgery.io.safetensors_format import read_header

# Where ckptsurgery refuses a file the library reads, and why.
STRICTER = {
    "duplicate key": "JSON with a key twice is ambiguous (the library keeps the last one "
    "silently); a checkpoint should not depend on which",
    "extra field": "a tensor entry with fields beyond dtype, shape and data_offsets is not "
    "one the format defines; ckptsurgery would drop the field silently on a copy",
    "sub-byte dtype": "F4, F6_E2M3 and F6_E3M2 pack several elements in a byte; torch has no "
    "dtype to read them into, so ckptsurgery cannot copy or convert them element-wise",
}

NAMES = ["w", "layer.0.weight", "", "\u00e9t\u00e9", "\U0001f600", "a" * 300, "../../x", "q\"'\n\0"]
DTYPES = sorted(SAFETENSORS_DTYPES)


def _file(header: Any, data: bytes = b"", *, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header, ensure_ascii=False).encode()
    return struct.pack("<Q", len(text)) + text + data


def _valid(rng: random.Random) -> tuple[dict[str, Any], bytes]:
    header: dict[str, Any] = {}
    if rng.random() < 0.5:
        header["__metadata__"] = {"format": "pt", rng.choice(NAMES): rng.choice(NAMES)}
    offset = 0
    for name in rng.sample(NAMES, rng.randint(0, 4)):
        code = rng.choice(DTYPES)
        shape = [rng.choice([0, 1, 2, 3]) for _ in range(rng.randint(0, 3))]
        n = SAFETENSORS_DTYPES[code][1]
        for d in shape:
            n *= d
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    items = list(header.items())
    rng.shuffle(items)  # the header's order need not be the data's
    return dict(items), bytes(rng.randrange(256) for _ in range(offset))


def _tensors(header: dict[str, Any]) -> list[str]:
    return [k for k in header if k != "__metadata__"]


# Each mutation: (name, function of (rng, header, data) -> file bytes).
def _mutations() -> Iterator[tuple[str, Callable[[random.Random, dict[str, Any], bytes], bytes]]]:
    def field(rng: random.Random, h: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
        names = _tensors(h)
        if names:
            h[rng.choice(names)][key] = value
        return h

    yield "valid", lambda rng, h, d: _file(h, d)
    yield "length field too long", lambda rng, h, d: _file(h, d)[:8] + b" " + _file(h, d)[8:]
    yield (
        "length field short",
        lambda rng, h, d: struct.pack("<Q", len(_file(h)) - 9) + _file(h, d)[8:],
    )
    yield "length field huge", lambda rng, h, d: struct.pack("<Q", 2**63) + _file(h, d)[8:]
    yield "truncated", lambda rng, h, d: _file(h, d)[: rng.randrange(len(_file(h, d)))]
    yield "trailing bytes", lambda rng, h, d: _file(h, d) + b"\0" * rng.randint(1, 9)
    yield "data short", lambda rng, h, d: _file(h, d[:-1])
    yield "empty file", lambda rng, h, d: b""
    yield (
        "offsets shifted",
        lambda rng, h, d: _file(
            field(rng, h, "data_offsets", [rng.randint(0, 9), rng.randint(0, 40)]), d
        ),
    )
    yield (
        "offsets past the end",
        lambda rng, h, d: _file(field(rng, h, "data_offsets", [len(d), len(d) + 4]), d),
    )
    yield "offsets reversed", lambda rng, h, d: _file(field(rng, h, "data_offsets", [4, 0]), d)
    yield (
        "offsets not ints",
        lambda rng, h, d: _file(
            field(rng, h, "data_offsets", rng.choice([[0.0, 4.0], ["0", "4"], [0], [-4, 0], None])),
            d,
        ),
    )
    yield (
        "bad dtype",
        lambda rng, h, d: _file(
            field(rng, h, "dtype", rng.choice(["f32", "F128", "", 4, None, ["F32"]])), d
        ),
    )
    yield (
        "bad shape",
        lambda rng, h, d: _file(
            field(rng, h, "shape", rng.choice([[-1], [1.0], ["2"], [2**64], None, 3, [True]])), d
        ),
    )
    yield (
        "shape and offsets disagree",
        lambda rng, h, d: _file(field(rng, h, "shape", [rng.randint(1, 5), 7]), d),
    )
    yield "extra field", lambda rng, h, d: _file(field(rng, h, "extra", 1), d)
    yield (
        "missing field",
        lambda rng, h, d: _file(
            {
                k: (
                    {f: v for f, v in s.items() if f != "shape"}
                    if isinstance(s, dict) and "shape" in s
                    else s
                )
                for k, s in h.items()
            },
            d,
        ),
    )
    yield "not an object", lambda rng, h, d: _file(rng.choice([[], "x", 1, None, [h]]), d)
    yield (
        "metadata values",
        lambda rng, h, d: _file(
            {
                **h,
                "__metadata__": rng.choice([{"a": 1}, {"a": None}, {"a": ["b"]}, [], "", 0, False]),
            },
            d,
        ),
    )
    yield "metadata null", lambda rng, h, d: _file({**h, "__metadata__": None}, d)
    yield "duplicate key", lambda rng, h, d: _dup(h, d)
    yield (
        "leading whitespace",
        lambda rng, h, d: _file(None, d, raw=b" " + json.dumps(h, ensure_ascii=False).encode()),
    )
    yield (
        "trailing spaces",
        lambda rng, h, d: _file(None, d, raw=json.dumps(h, ensure_ascii=False).encode() + b"   "),
    )
    yield (
        "sub-byte dtype",
        lambda rng, h, d: _file(
            {
                **h,
                "packed": {
                    "dtype": rng.choice(["F4", "F6_E2M3", "F6_E3M2"]),
                    "shape": [8],
                    "data_offsets": [len(d), len(d) + 4 if rng.random() < 0.5 else len(d) + 6],
                },
            },
            d + b"\0" * 6,
        ),
    )
    yield "not utf-8", lambda rng, h, d: _file(None, d, raw=b'{"\xff": 1}')
    yield "lone surrogate", lambda rng, h, d: _file(None, d, raw=_surrogate(h))
    yield "not json", lambda rng, h, d: _file(None, d, raw=b"{" + b'"a"' * rng.randint(0, 3))


def _dup(h: dict[str, Any], d: bytes) -> bytes:
    names = _tensors(h)
    if not names:
        return _file(None, d, raw=b'{"a": 1, "a": 1}')
    text = json.dumps(h, ensure_ascii=False)
    first = json.dumps({names[0]: h[names[0]]}, ensure_ascii=False)[1:-1]
    return _file(None, d, raw=(text[:-1] + ", " + first + "}").encode())


def _surrogate(h: dict[str, Any]) -> bytes:
    spec = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
    return (
        (b'{"\\ud800": ' + json.dumps(spec).encode() + b"}")
        if not _tensors(h)
        else (json.dumps({**h, "\ud800x": spec}).encode())
    )


def _cases() -> Iterator[tuple[str, int, bytes]]:
    for name, mutate in _mutations():
        for seed in range(40):
            rng = random.Random(f"{name}/{seed}")
            header, data = _valid(rng)
            yield name, seed, mutate(rng, header, data)


def _library(blob: bytes) -> dict[str, tuple[str, list[int], bytes]] | None:
    try:
        return {n: (t["dtype"], t["shape"], bytes(t["data"])) for n, t in deserialize(blob)}
    except (SafetensorError, Exception):  # the library's only refusal is SafetensorError
        return None


def _ours(blob: bytes) -> dict[str, tuple[str, list[int], bytes]] | None:
    try:
        header = read_header(io.BytesIO(blob), len(blob), source="generated")
    except FormatError:
        return None
    codes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    return {
        name: (
            codes[(e.info.dtype, _itemsize(e.info.dtype))],
            list(e.info.shape),
            blob[e.begin : e.end],
        )
        for name, e in header.entries.items()
    }


def _itemsize(dtype: str) -> int:
    return next(size for name, size in SAFETENSORS_DTYPES.values() if name == dtype)


CASES = list(_cases())


@pytest.mark.parametrize("mutation", sorted({name for name, _, _ in CASES}))
def test_the_same_verdict_and_the_same_tensors_as_the_library(mutation: str) -> None:
    accepted = disagreed = 0
    for name, seed, blob in CASES:
        if name != mutation:
            continue
        theirs, ours = _library(blob), _ours(blob)
        if theirs is not None and ours is None and mutation in STRICTER:
            disagreed += 1
            continue
        assert ours == theirs, (mutation, seed, blob[:300])
        accepted += ours is not None
    if mutation == "valid":
        assert accepted == 40
    if mutation in STRICTER:  # the documented difference is real (or the entry goes)
        assert disagreed, mutation


def test_the_metadata_is_the_library_s() -> None:
    import torch
    from safetensors.torch import save

    blob = save({"a": torch.ones(1)}, metadata={"k": "v", "\u00e9": ""})
    header = read_header(io.BytesIO(blob), len(blob), source="x")
    assert header.metadata == {"k": "v", "\u00e9": ""}


def test_the_header_size_limit_is_the_library_s() -> None:
    """The library reads a header of 100,000,000 bytes and refuses one byte more (the limit
    was 100 MiB here: 4.8 MB of headers only ckptsurgery read)."""
    over = struct.pack("<Q", 100_000_001) + b"{}" + b" " * (100_000_001 - 2)
    assert _library(over) is None
    assert _ours(over) is None
    del over
    at_limit = struct.pack("<Q", 100_000_000) + b"{}"  # refused for its size? only for being cut
    with pytest.raises(FormatError, match="but the file has only 2"):
        read_header(io.BytesIO(at_limit), len(at_limit), source="x")
