"""The arithmetic of folding a LoRA pair into its base weight (see :mod:`ckptsurgery.plan.lora`).

``lora-fold`` over inputs ``(W, A, B)`` makes ``W + scale * delta``, computed in float32
(float64 when ``W`` is) with one ``addmm`` that never writes to its inputs, and stored in
``W``'s dtype or the op's ``dtype``:

- ``linear``: ``W [out, in] + scale * B [out, r] @ A [r, in]``; with ``fan_in_fan_out``
  ``W [in, out] + scale * (B @ A).T``;
- ``embedding``: ``W [num, dim] + scale * (B [dim, r] @ A [r, num]).T``;
- ``conv``: ``W [out, in, *k] + scale * B [out, r, 1...] @ A [r, in, *k]`` with ``A`` and
  ``W`` flattened after their first dimension (peft's 1x1 and kxk formulas are this product);
- ``bias`` over ``(b, lora_B.bias)``: ``b + scale * lora_B.bias``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ckptsurgery.errors import RuleError
from ckptsurgery.io.dtypes import TensorInfo, torch_dtype
from ckptsurgery.plan.model import Op

if TYPE_CHECKING:
    import torch

__all__ = ["lora_fold"]


def lora_fold(
    op: Op, fetch: Sequence[Callable[[], torch.Tensor]], inputs: Sequence[TensorInfo]
) -> torch.Tensor:
    """The folded tensor of ``op`` (a ``lora-fold``) from its inputs, fetched one by one."""
    import torch

    kind, scale = op.param("kind"), float(op.param("scale"))
    acc = torch.float64 if inputs[0].dtype == "float64" else torch.float32
    out_dtype = torch_dtype(op.param("dtype") or inputs[0].dtype)
    w = fetch[0]().to(acc)  # the input itself when it is float32: only read below
    if kind == "bias":
        return torch.add(w, fetch[1]().to(acc), alpha=scale).to(out_dtype)
    a = fetch[1]().to(acc)
    b = fetch[2]().to(acc)
    if kind == "linear" and not op.param("fan_in_fan_out"):
        out = torch.addmm(w, b, a, alpha=scale)
    elif kind in ("linear", "embedding"):  # the weight is stored [in, out]: (B @ A).T
        out = torch.addmm(w, a.T, b.T, alpha=scale)
    elif kind == "conv":
        flat = torch.addmm(w.reshape(w.shape[0], -1), b.flatten(1), a.flatten(1), alpha=scale)
        out = flat.reshape(w.shape)
    else:
        raise RuleError(f"lora-fold: unknown kind {kind!r}")
    return out.to(out_dtype)
