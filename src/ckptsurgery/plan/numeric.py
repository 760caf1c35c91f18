"""Weighted sums of stored tensors with numpy, straight from their bytes: no torch.

A mean of checkpoints is elementwise arithmetic on little-endian floats, which numpy does as
well as torch; importing torch costs more (seconds and ~650 MB) than averaging a gigabyte.
So a ``mean`` / ``weighted-sum`` whose inputs and output are float16, bfloat16, float32 or
float64 is computed here, from each input's bytes (a read-only map of the file where the
source allows), into the output's bytes.

The result is bit for bit what :func:`ckptsurgery.plan.ops.weighted_sum` computes with torch:

- each input is widened to the accumulator (float32, or float64 when an input is float64)
  and multiplied by its weight, rounded to the accumulator's type; the first product is the
  accumulator, each later one is added to it (rounded after each addition), in input order;
- the accumulator is stored as float16 with IEEE round-to-nearest-even (numpy's and torch's
  cast), or as bfloat16 as torch rounds: nearest-even on the upper 16 bits of the float32,
  every NaN stored as ``0xffff``; a float64 accumulator is narrowed to float16 or bfloat16
  through float32, as torch does.

The sum runs a block of elements at a time over all inputs, so the block's accumulator stays
in the cache while each input passes once, and memory holds the output and small blocks
besides the inputs' maps.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = ["SUMMABLE", "summable", "weighted_sum_bytes"]

# What the sum takes and makes: the float types numpy holds (bfloat16 as its bits).
SUMMABLE = ("float16", "bfloat16", "float32", "float64")
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}

# Elements summed at a time: 256 Ki float32 accumulator (1 MiB) and as much for a product.
BLOCK = 1 << 18
# Bytes of inputs copied in memory (not maps of a file) held at once to be summed together.
HOLD = 64 << 20

Bytes = bytes | bytearray | memoryview


def summable(inputs: Sequence[str], out: str) -> bool:
    """Whether a weighted sum of ``inputs`` dtypes stored as ``out`` is computed here."""
    return out in SUMMABLE and all(d in SUMMABLE for d in inputs)


def weighted_sum_bytes(
    fetch: Sequence[Callable[[], Bytes]],
    dtypes: Sequence[str],
    weights: Sequence[float],
    *,
    accumulate: str,
    dtype: str,
    numel: int,
) -> memoryview:
    """The bytes of ``sum(w * x)`` over the inputs (``fetch[i]()`` gives input i's stored
    bytes, of dtype ``dtypes[i]``, ``numel`` elements each), accumulated in ``accumulate``
    ("float32" or "float64") and stored as ``dtype``. The inputs are never written to.

    Inputs that are maps of a file (or small) are summed together a block at a time. An input
    that is a big copy in memory is added to a whole accumulator and let go before the next
    is fetched, so the inputs held at once stay bounded (the sum is the same either way).
    """
    import numpy as np

    if len(fetch) != len(weights) or not fetch:
        raise ValueError(f"{len(fetch)} inputs for {len(weights)} weights")
    acc_type = np.dtype(accumulate)
    w = [acc_type.type(x) for x in weights]
    out = np.empty(numel, dtype=np.uint16 if dtype == "bfloat16" else np.dtype(dtype))
    held: list[tuple[np.ndarray, str, Any]] = []  # fetched, not yet summed
    copied = 0
    whole: np.ndarray | None = None  # the accumulator of every element, once needed
    with np.errstate(all="ignore"):  # overflow to inf and NaN are values, as in torch
        for f, dt, wi in zip(fetch, dtypes, w, strict=True):
            data = f()
            arr = _as_array(data, dt, numel)
            mapped = isinstance(memoryview(data).obj, mmap.mmap)
            if whole is None and (mapped or copied + arr.nbytes <= HOLD):
                held.append((arr, dt, wi))
                copied += 0 if mapped else arr.nbytes
                continue
            if whole is None:
                whole = np.empty(numel, dtype=acc_type)
                _sum([*held, (arr, dt, wi)], acc_type, numel, into=whole)
                held = []
            else:
                _sum([(arr, dt, wi)], acc_type, numel, into=whole, add=True)
            del data, arr
        if whole is None:
            _sum(held, acc_type, numel, store=(out, dtype))
        else:
            for start in range(0, numel, BLOCK):
                _store(whole[start : start + BLOCK], out[start : start + BLOCK], dtype)
    return memoryview(out.data).cast("B")


def _sum(
    inputs: Sequence[tuple[np.ndarray, str, Any]],
    acc_type: np.dtype,
    numel: int,
    *,
    into: np.ndarray | None = None,
    add: bool = False,
    store: tuple[np.ndarray, str] | None = None,
) -> None:
    """Block by block: the sum of ``w * x`` over ``inputs`` (in order), added to ``into``
    (``add``) or written to it, or stored in ``store``'s array as its dtype."""
    import numpy as np

    block = min(BLOCK, max(numel, 1))
    acc = np.empty(block, dtype=acc_type)
    tmp = np.empty(block, dtype=acc_type)
    wide = np.empty(block, dtype=acc_type)
    for start in range(0, numel, block):
        stop = min(start + block, numel)
        n = stop - start
        a = into[start:stop] if into is not None else acc[:n]
        first = not add
        for arr, dt, wi in inputs:
            part = _widen(arr[start:stop], dt, acc_type, wide[:n])
            np.multiply(part, wi, out=a if first else tmp[:n])
            if not first:
                np.add(a, tmp[:n], out=a)
            first = False
        if store is not None:
            _store(a, store[0][start:stop], store[1])


def _as_array(data: Bytes, dtype: str, numel: int) -> np.ndarray:
    import numpy as np

    kind = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
    return np.frombuffer(data, dtype=kind, count=numel)  # stored little-endian, as is numpy here


def _widen(part: np.ndarray, dtype: str, acc: np.dtype, into: np.ndarray) -> np.ndarray:
    """``part`` (stored as ``dtype``) as the accumulator's type, in ``into`` unless it
    already is that type."""
    import numpy as np

    if dtype == "bfloat16":  # its bits are a float32's upper half
        bits = into[: len(part)].view(np.uint32) if acc == np.float32 else None
        if bits is not None:
            np.left_shift(part, 16, out=bits, dtype=np.uint32)
            return into[: len(part)]
        wide = np.left_shift(part.astype(np.uint32), 16).view(np.float32)
        return wide.astype(acc)
    if part.dtype == acc:
        return part
    into[: len(part)] = part
    return into[: len(part)]


def _store(acc: np.ndarray, out: np.ndarray, dtype: str) -> None:
    import numpy as np

    # torch narrows a float64 to float16 or bfloat16 through float32 (two roundings)
    f32 = acc if acc.dtype == np.float32 or dtype == "float64" else acc.astype(np.float32)
    if dtype != "bfloat16":
        out[...] = f32
        return
    u = f32.view(np.uint32)
    # nearest-even on the upper half: add 0x7fff plus the lowest kept bit, keep the top 16
    rounded = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16
    out[...] = rounded
    out[np.isnan(f32)] = 0xFFFF
