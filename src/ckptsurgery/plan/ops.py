"""The operations a plan entry can name: what each makes from its inputs' facts (before any
byte is read) and from their values (when the executor runs it).

- ``copy``: the source bytes, unchanged; never touches torch.
- ``cast(dtype)``: ``tensor.to(dtype)``, bit for bit as torch does it, streamed through a
  small buffer (a cast is elementwise, so a tensor never has to be in memory whole).
- ``mean`` / ``weighted-sum(weights[, dtype])``: the weighted sum of N tensors of one shape
  (weights normalised to sum 1, so it is a mean), accumulated in float32 (float64 when an
  input is float64, complex when one is complex) and stored in the first input's dtype, or
  ``dtype`` when given.
- ``rows``, ``in-chans``, ``resample-pos-embed``: the shape adapters of
  :mod:`ckptsurgery.plan.adapters`, one tensor at a time; with ``dtype``, their result is cast
  as ``cast`` does.
- ``task-arithmetic``, ``ties``, ``dare-linear``, ``dare-ties`` (weights, density, lambda,
  normalize, seed[, dtype]): the fine-tunes (inputs 1..n) merged into the base (input 0), see
  :mod:`ckptsurgery.plan.methods`; computed in float32 (float64 when an input is) and stored
  in the base's dtype, or ``dtype`` when given.
- ``lora-fold(kind, r, alpha, scale[, fan_in_fan_out, dtype])``: a LoRA pair folded into its
  base weight, ``W + scale * B @ A`` in float32 (:mod:`ckptsurgery.plan.lora_math`).

Only the functions that compute values import torch, and only when called.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, BinaryIO

from ckptsurgery.errors import RuleError
from ckptsurgery.io.dtypes import TensorInfo
from ckptsurgery.plan import adapters, methods
from ckptsurgery.plan.model import Op

if TYPE_CHECKING:
    import torch

__all__ = [
    "CAST_DTYPES",
    "CastWriter",
    "cast_op",
    "castable",
    "check_dtype",
    "evaluate",
    "mean_op",
    "output_info",
]

# What --dtype may ask for.
CAST_DTYPES = ("float32", "float16", "bfloat16")
# What a cast touches: real floating tensors. Integer and bool tensors (num_batches_tracked,
# position ids) are never cast, nor complex ones, nor float8 data (quantized values whose
# meaning lives in separate scale tensors).
_CASTABLE = ("float16", "bfloat16", "float32", "float64")
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}

# The operations that never write to their inputs (they may be read-only maps of a file).
READS_ONLY = ("mean", "weighted-sum", "lora-fold", *methods.METHODS)

# Bytes converted at a time by a streamed cast: bounds its memory whatever the tensor's size.
CAST_CHUNK = 8 << 20


def check_dtype(dtype: str | None) -> str | None:
    """``dtype`` when it is one --dtype may ask for, else :class:`RuleError` naming them."""
    if dtype is not None and dtype not in CAST_DTYPES:
        raise RuleError(f"dtype {dtype!r} is not one of {', '.join(CAST_DTYPES)}")
    return dtype


def castable(dtype: str) -> bool:
    return dtype in _CASTABLE


def cast_op(dtype: str) -> Op:
    return Op("cast", (("dtype", dtype),))


def mean_op(weights: Sequence[float], dtype: str | None = None) -> Op:
    """A mean when the weights are equal, else a weighted sum (of weights summing to 1)."""
    name = "mean" if len(set(weights)) <= 1 else "weighted-sum"
    params: tuple[tuple[str, object], ...] = (("weights", tuple(weights)),)
    if dtype is not None:
        params += (("dtype", dtype),)
    return Op(name, params)


def output_info(op: Op, inputs: Sequence[TensorInfo]) -> TensorInfo:
    """The facts of what ``op`` makes from tensors with facts ``inputs``; no data is read."""
    first = inputs[0]
    dtype = op.param("dtype") or first.dtype
    if op.name in adapters.ADAPTER_OPS:
        item = _ITEMSIZE[dtype] if dtype != first.dtype else first.nbytes // max(first.numel, 1)
        return adapters.adapted_info(op, first, item)
    if dtype == first.dtype:
        return first
    return TensorInfo(first.shape, dtype, math.prod(first.shape) * _ITEMSIZE[dtype])


def evaluate(
    op: Op,
    fetch: Sequence[Callable[[], torch.Tensor]],
    inputs: Sequence[TensorInfo],
    *,
    name: str = "",
) -> torch.Tensor:
    """The value ``op`` makes from the tensors described by ``inputs``; ``fetch`` gives each
    when called, so that a mean holds one input at a time besides its accumulator. ``name``:
    the output's key (DARE seeds its random drop from it)."""
    if op.name == "copy":
        return fetch[0]()
    if op.name == "cast":
        return cast(fetch[0](), op.param("dtype"))
    if op.name in ("mean", "weighted-sum"):
        return weighted_sum(
            (f() for f in fetch),
            op.param("weights"),
            accumulate=accumulator([i.dtype for i in inputs]),
            dtype=op.param("dtype") or inputs[0].dtype,
        )
    if op.name in methods.METHODS:
        return methods.compute(
            op, fetch, inputs, name=name, accumulate=accumulator([i.dtype for i in inputs])
        )
    if op.name in adapters.ADAPTER_OPS:
        out = adapters.compute(op, fetch[0]())
        return cast(out, op.param("dtype")) if op.param("dtype") else out
    if op.name == "lora-fold":
        from ckptsurgery.plan.lora_math import lora_fold

        return lora_fold(op, fetch, inputs)
    raise RuleError(f"unknown operation {op.name!r}")


def cast(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """``t.to(dtype)``: torch's own rounding, so the bits are exactly torch's."""
    from ckptsurgery.io.dtypes import torch_dtype

    return t.to(torch_dtype(dtype))


def weighted_sum(
    tensors: Iterable[torch.Tensor], weights: Sequence[float], *, accumulate: str, dtype: str
) -> torch.Tensor:
    """``sum(w * t)`` accumulated in ``accumulate`` and stored as ``dtype``. The tensors are
    taken one at a time and never written to."""
    import torch

    from ckptsurgery.io.dtypes import torch_dtype

    acc_dtype = torch_dtype(accumulate)
    acc: torch.Tensor | None = None
    for w, t in zip(weights, tensors, strict=True):
        # Each product is rounded, then added (not fused): the sum numpy makes, bit for bit
        # (ckptsurgery.plan.numeric). A new tensor: the input is never written.
        product = torch.mul(t.to(dtype=acc_dtype), w)
        if acc is None:
            acc = product
        else:
            acc.add_(product.to(device=acc.device))
        del t, product  # one input at a time
    if acc is None:
        raise RuleError("a mean needs at least one tensor")
    return acc.to(torch_dtype(dtype))


def accumulator(dtypes: Sequence[str]) -> str:
    """The dtype to accumulate a mean of ``dtypes`` in: float32 at least, never narrower
    than an input (float64, complex128 when one is)."""
    wide = any(d in ("float64", "complex128") for d in dtypes)
    if any(d.startswith("complex") for d in dtypes):
        return "complex128" if wide else "complex64"
    return "float64" if wide else "float32"


class CastWriter:
    """A file-like sink that casts the little-endian ``src`` elements written to it to ``dst``
    and writes those to ``f``, ``CAST_CHUNK`` bytes at a time.

    A source streams a tensor's stored bytes into it (:meth:`Checkpoint.write_data`), so a
    cast holds a chunk, not the tensor. Call :meth:`close` at the end: it checks that no
    partial element is left.
    """

    def __init__(self, f: BinaryIO, src: str, dst: str, *, buffer: bytearray | None = None) -> None:
        from ckptsurgery.io.dtypes import torch_dtype

        self._f = f
        self._src, self._dst = torch_dtype(src), torch_dtype(dst)
        self._item = _ITEMSIZE[src]
        # A buffer may be shared by the casts of one write (one tensor at a time): allocating
        # and zeroing a fresh one per tensor costs more than the cast of a small tensor.
        if buffer is None or len(buffer) < self._item:
            buffer = bytearray(CAST_CHUNK)
        self._buf = memoryview(buffer)[: len(buffer) - len(buffer) % self._item]
        self._used = 0
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        while view:
            take = min(len(view), len(self._buf) - self._used)
            self._buf[self._used : self._used + take] = view[:take]
            self._used += take
            view = view[take:]
            if self._used == len(self._buf):
                self._flush()
        return n

    def _flush(self) -> None:
        import torch

        from ckptsurgery.io.memory import tensor_bytes

        whole = self._used - self._used % self._item
        if not whole:
            return
        chunk = torch.frombuffer(self._buf.obj, dtype=torch.uint8, count=whole)
        out = chunk.view(self._src).to(self._dst)
        data = tensor_bytes(out)
        self._f.write(data)
        self.written += len(data)
        rest = self._used - whole
        self._buf[:rest] = self._buf[whole : self._used]
        self._used = rest

    def close(self) -> None:
        self._flush()
        if self._used:
            raise RuleError(f"{self._used} bytes left over: not whole {self._src} elements")

    def flush(self) -> None:
        """Nothing to do: :meth:`close` writes what is buffered."""
