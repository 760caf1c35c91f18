"""Shape adapters: the operations that change a tensor's shape so that a checkpoint fits another
model, each a short function with its shapes documented (timm's ``_manipulate.py`` is the
model), and the shape each makes, computed from the header alone.

- ``rows(indices)``: ``t[indices]`` along dim 0, ``[R, ...] -> [len(indices), ...]``. A
  class-subset head (``fc.weight`` ``[1000, 512]`` -> ``[10, 512]``, ``fc.bias`` ``[1000]``
  -> ``[10]``) or a vocabulary subset of an embedding. Any dtype; the kept rows' bits are
  unchanged. Indices may repeat; their order is the output's.
- ``in-chans(channels)``: a first convolution ``[O, I, kh, kw] -> [O, N, kh, kw]`` with timm's
  ``adapt_input_conv(N, w, base_chans=I)``: the sum over ``I`` for ``N = 1``; otherwise
  ``I`` repeated ``ceil(N / I)`` times, cut to ``N`` and scaled by ``I / N``, so that an
  input with the same value on every channel gives the same activations. Computed in
  float32, stored in the input's dtype.
- ``resample-pos-embed(size, old_size, prefix_tokens, interpolation, antialias)``: timm's
  ``resample_abs_pos_embed``: an absolute position embedding ``[1, K + h*w, D] -> [1, K +
  H*W, D]`` (or without the leading 1, ``[K + h*w, D] -> [K + H*W, D]``) whose ``K`` prefix
  (class, distillation, register) tokens are kept and whose grid is interpolated with
  ``torch.nn.functional.interpolate`` in float32 and stored in the input's dtype.

An op's parameters are data (:class:`~ckptsurgery.plan.model.Op`), bound to one tensor by
:mod:`ckptsurgery.plan.adapt`; a ``dtype`` parameter casts the result as ``--dtype`` does.
Torch is imported only by the functions that compute values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ckptsurgery.errors import RuleError
from ckptsurgery.io.dtypes import TensorInfo
from ckptsurgery.plan.model import Op

if TYPE_CHECKING:
    import torch

__all__ = [
    "ADAPTER_OPS",
    "INTERPOLATIONS",
    "adapt_in_chans",
    "adapted_info",
    "compute",
    "in_chans_op",
    "resample_op",
    "resample_pos_embed",
    "rows_op",
    "take_rows",
]

ADAPTER_OPS = ("rows", "in-chans", "resample-pos-embed")
# The modes of torch.nn.functional.interpolate that take a 4-D input; antialias applies to
# the first two only.
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "nearest-exact", "area")
ANTIALIASED = ("bicubic", "bilinear")


def rows_op(indices: Sequence[int], of: int) -> Op:
    """Keep rows ``indices`` (of ``of``) along dim 0."""
    return Op("rows", (("indices", tuple(indices)), ("of", of)))


def in_chans_op(channels: int, base_chans: int) -> Op:
    """Adapt a ``base_chans``-channel first convolution to ``channels`` input channels."""
    return Op("in-chans", (("channels", channels), ("base_chans", base_chans)))


def resample_op(
    size: tuple[int, int],
    old_size: tuple[int, int],
    *,
    prefix_tokens: int,
    interpolation: str,
    antialias: bool,
) -> Op:
    """Resample a position embedding's ``old_size`` grid to ``size``, keeping its prefix."""
    return Op(
        "resample-pos-embed",
        (
            ("size", tuple(size)),
            ("old_size", tuple(old_size)),
            ("prefix_tokens", prefix_tokens),
            ("interpolation", interpolation),
            ("antialias", antialias),
        ),
    )


def adapted_info(op: Op, info: TensorInfo, itemsize: int) -> TensorInfo:
    """The facts of what adapter ``op`` makes of a tensor with facts ``info``, stored with
    ``itemsize`` bytes per element."""
    shape = list(info.shape)
    if op.name == "rows":
        shape[0] = len(op.param("indices"))
    elif op.name == "in-chans":
        shape[1] = op.param("channels")
    elif op.name == "resample-pos-embed":
        h, w = op.param("size")
        shape[-2] = op.param("prefix_tokens") + h * w
    else:
        raise RuleError(f"unknown operation {op.name!r}")
    return TensorInfo(tuple(shape), op.param("dtype") or info.dtype, math.prod(shape) * itemsize)


def compute(op: Op, t: torch.Tensor) -> torch.Tensor:
    """The value adapter ``op`` makes of ``t`` (not yet cast to the op's ``dtype``)."""
    if op.name == "rows":
        return take_rows(t, op.param("indices"))
    if op.name == "in-chans":
        return adapt_in_chans(t, op.param("channels"))
    if op.name == "resample-pos-embed":
        return resample_pos_embed(
            t,
            op.param("size"),
            old_size=op.param("old_size"),
            prefix_tokens=op.param("prefix_tokens"),
            interpolation=op.param("interpolation"),
            antialias=op.param("antialias"),
        )
    raise RuleError(f"unknown operation {op.name!r}")


def take_rows(t: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """``t[indices]``: ``[R, ...] -> [len(indices), ...]``, a new contiguous tensor."""
    import torch

    return t.index_select(0, torch.tensor(list(indices), dtype=torch.long)).contiguous()


def adapt_in_chans(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """timm's ``adapt_input_conv(channels, weight, base_chans=I)``:
    ``[O, I, kh, kw] -> [O, channels, kh, kw]``, computed in float32 and stored in the
    weight's dtype (``weight`` itself when ``channels == I``)."""
    base = weight.shape[1]
    if channels == base:
        return weight
    w = weight.float()  # half precision has no sum on some CPUs; timm computes in float32
    if channels == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        repeat = math.ceil(channels / base)
        w = w.repeat(1, repeat, 1, 1)[:, :channels, :, :]
        w *= base / float(channels)
    return w.to(weight.dtype)


def resample_pos_embed(
    posemb: torch.Tensor,
    size: Sequence[int],
    *,
    old_size: Sequence[int],
    prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """timm's ``resample_abs_pos_embed``: ``[1, K + h*w, D] -> [1, K + H*W, D]`` (or the same
    without the leading 1), the ``K = prefix_tokens`` first tokens kept, the ``h x w`` grid
    (``old_size``) interpolated to ``H x W`` (``size``) in float32 and stored in the input's
    dtype (``posemb`` itself when the grid is unchanged)."""
    import torch
    import torch.nn.functional as F

    if tuple(old_size) == tuple(size):
        return posemb
    flat = posemb.dim() == 2  # [T, D], as CLIP stores it
    x = posemb.unsqueeze(0) if flat else posemb
    prefix, grid = x[:, :prefix_tokens], x[:, prefix_tokens:]
    dim = grid.shape[-1]
    g = grid.float().reshape(1, old_size[0], old_size[1], -1).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=tuple(size), mode=interpolation, antialias=antialias)
    out = g.permute(0, 2, 3, 1).reshape(1, -1, dim).to(posemb.dtype)
    if prefix_tokens:
        out = torch.cat([prefix, out], dim=1)
    return out[0] if flat else out
