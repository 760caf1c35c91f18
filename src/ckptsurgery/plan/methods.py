"""Merging fine-tunes of one base model through their task vectors: task arithmetic, TIES,
DARE (linear and TIES), as mergekit defines them ("generalized task arithmetic",
``mergekit/merge_methods/generalized_task_arithmetic.py`` and ``mergekit/sparsify.py``).

For one tensor, with the base ``b`` and the models ``x_1 .. x_n`` (weights ``w_i``):

1. task vectors: ``d_i = x_i - b``;
2. sparsify each (``density`` in (0, 1]):

   - ``ties``: keep the ``k = int(density * numel)`` entries of largest magnitude, zero the
     rest (no rescaling);
   - ``dare-linear`` / ``dare-ties``: keep each entry with probability ``density`` and divide
     what is kept by ``density`` (DARE's "drop and rescale");
   - ``task-arithmetic``: nothing;
3. weight: ``v_i = w_i * d_i``;
4. mix:

   - ``ties`` / ``dare-ties`` (sign consensus): the elected sign of an entry is that of
     ``sum_i v_i`` (``+`` where the sum is 0); ``mixed = sum_i v_i * [sign(v_i) == elected]``;
     normalised (``ties``' default), it is divided by ``sum_i w_i * [sign(v_i) == elected]``
     (the weights of the agreeing models; 1 where none agrees): the "disjoint mean";
   - ``task-arithmetic`` / ``dare-linear``: ``mixed = sum_i v_i``; normalised, divided by
     ``sum_i w_i`` (1 when that is within 1e-8 of 0);
5. ``result = b + lambda * mixed``, stored in the base's dtype (or ``--dtype``).

``normalize`` defaults as in mergekit: true for ``ties``, false for the other three.

Where this differs from mergekit, and why:

- the arithmetic is done in float32 (float64 when an input is float64), not in the base's
  dtype: a bfloat16 task vector loses most of its bits in the subtraction;
- DARE's rescale is ``1 / density`` (the DARE paper, and mergekit up to 0.0.5); mergekit now
  rescales the kept entries to the L1 norm of the whole task vector, which is ``1 / density``
  in expectation;
- DARE's random drop is reproducible: each output tensor has its own ``torch.Generator``
  seeded from ``(seed, output key)`` (:func:`tensor_seed`), and the models' masks are drawn
  from it in order (``torch.rand(shape, generator=g) < density``, float32), so the result
  does not depend on the order the tensors are written in, on threads or on other tensors;
  mergekit draws from torch's global generator;
- TIES keeps at least one entry (mergekit refuses a tensor where ``density * numel < 1``),
  and among entries of equal magnitude it keeps those with the lower flat index (mergekit's
  ``argsort`` leaves that order unspecified);
- ``density`` is required for ties and DARE (mergekit defaults it to 1, which keeps every
  entry and quietly turns them into sign consensus or plain task arithmetic); it is refused
  for task arithmetic, where it means nothing; ``seed`` (default 0) applies to DARE only;
- weights default to 1 per model (mergekit requires one) and may be any finite number
  (negative weights subtract a task vector).

Only :func:`compute` imports torch, when called.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ckptsurgery.errors import MergeError
from ckptsurgery.io.dtypes import TensorInfo
from ckptsurgery.plan.model import METHOD_OPS, Op

if TYPE_CHECKING:
    import torch

__all__ = ["METHODS", "compute", "method_op", "tensor_seed"]

METHODS = METHOD_OPS
_SPARSIFY = {
    "task-arithmetic": None,
    "ties": "magnitude",
    "dare-linear": "random",
    "dare-ties": "random",
}
_CONSENSUS = ("ties", "dare-ties")
NORMALIZE = {"task-arithmetic": False, "ties": True, "dare-linear": False, "dare-ties": False}


def method_op(
    method: str,
    *,
    models: int,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    lambda_: float = 1.0,
    seed: int | None = None,
    normalize: bool | None = None,
) -> Op:
    """The checked operation of ``method`` over ``models`` fine-tunes (besides the base), with
    every parameter spelled out: ``Op("ties", (("weights", (1.0, 1.0)), ("density", 0.5),
    ("lambda", 1.0), ("normalize", True)))``. Raises :class:`MergeError` for bad values."""
    if method not in METHODS:
        raise MergeError(f"merge method {method!r} is not one of {', '.join(METHODS)}")
    if models < 1:
        raise MergeError(f"{method} needs a base and at least one model to merge into it")
    if weights is None or len(weights) == 0:
        w = tuple(1.0 for _ in range(models))
    else:
        if len(weights) != models:
            raise MergeError(
                f"{len(weights)} weight{'s' if len(weights) != 1 else ''} for {models} "
                f"model{'s' if models != 1 else ''}; give one weight per model after the base, "
                "in order (or none for 1 each)"
            )
        w = tuple(_number(x, "weight") for x in weights)
    sparsify = _SPARSIFY[method]
    params: list[tuple[str, Any]] = [("weights", w)]
    if sparsify is None:
        if density is not None:
            raise MergeError(
                "density does not apply to task-arithmetic (it keeps every entry); use ties, "
                "dare-linear or dare-ties to sparsify"
            )
    else:
        if density is None:
            raise MergeError(
                f"{method} needs a density: the fraction of each task vector to keep, in "
                "(0, 1], e.g. --density 0.5 (1 keeps every entry)"
            )
        d = _number(density, "density")
        if not 0 < d <= 1:
            raise MergeError(f"density {density!r} is not in (0, 1]; e.g. 0.5 keeps half")
        params.append(("density", d))
    params.append(("lambda", _number(lambda_, "lambda")))
    params.append(("normalize", NORMALIZE[method] if normalize is None else bool(normalize)))
    if sparsify == "random":
        s = 0 if seed is None else seed
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise MergeError(f"seed {seed!r} is not a non-negative integer")
        params.append(("seed", s))
    elif seed is not None:
        raise MergeError(f"seed applies to DARE's random drop only, not to {method}")
    return Op(method, tuple(params))


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MergeError(f"{what} {value!r} is not a number")
    if not math.isfinite(value):
        raise MergeError(f"{what} {value!r} is not a finite number")
    return float(value)


def tensor_seed(seed: int, key: str) -> int:
    """The seed of the generator that drops entries of output tensor ``key``: the first 8
    bytes (little-endian) of ``sha256(f"{seed}:{key}")``, less its top bit."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def compute(
    op: Op,
    fetch: Sequence[Callable[[], torch.Tensor]],
    inputs: Sequence[TensorInfo],
    *,
    name: str,
    accumulate: str,
) -> torch.Tensor:
    """The merged tensor ``name``: ``fetch[0]`` gives the base, the others the models. The
    inputs are never written (they may be read-only maps of the files); the models' task
    vectors are held together only under sign consensus, which needs them all."""
    import torch

    from ckptsurgery.io.dtypes import torch_dtype

    acc = torch_dtype(accumulate)
    method = op.name
    weights: tuple[float, ...] = op.param("weights")
    density: float = op.param("density", 1.0)
    sparsify = _SPARSIFY[method]
    generator = None
    if sparsify == "random":
        generator = torch.Generator().manual_seed(tensor_seed(op.param("seed", 0), name))
    base = fetch[0]().to(acc)
    votes: list[torch.Tensor] = []
    mixed: torch.Tensor | None = None
    for w, f in zip(weights, fetch[1:], strict=True):
        delta = f().to(acc) - base  # a new tensor: the inputs stay as they are
        if sparsify == "magnitude":
            delta = trim(delta, density)
        elif sparsify == "random":
            delta = drop(delta, density, generator)
        delta.mul_(w)
        if method in _CONSENSUS:
            votes.append(delta)
        elif mixed is None:
            mixed = delta
        else:
            mixed.add_(delta)
    if method in _CONSENSUS:
        mixed, divisor = _consensus(votes, weights)
        del votes
    else:
        assert mixed is not None  # at least one model (checked by method_op)
        total = math.fsum(weights)
        divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total, dtype=acc)
    if op.param("normalize"):
        mixed.div_(divisor)
    lam = op.param("lambda", 1.0)
    if lam != 1:
        mixed.mul_(lam)
    out = base + mixed
    return out.to(torch_dtype(op.param("dtype") or inputs[0].dtype))


def _consensus(
    votes: Sequence[torch.Tensor], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES' sign election and disjoint sum of the weighted task vectors ``votes``: the sum of
    the entries whose sign is the elected one, and the sum of the weights of those models."""
    import torch

    total = votes[0].clone()
    for v in votes[1:]:
        total.add_(v)
    positive = total >= 0  # the elected sign: + where the weighted mass is >= 0
    del total
    mixed = torch.zeros_like(votes[0])
    divisor = torch.zeros_like(votes[0])
    for v, w in zip(votes, weights, strict=True):
        agree = torch.where(positive, v > 0, v < 0)
        mixed.add_(torch.where(agree, v, 0.0))
        divisor.add_(agree.to(divisor.dtype), alpha=w)
    divisor[divisor == 0] = 1
    return mixed, divisor


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``max(1, int(density * numel))`` entries of largest
    magnitude zeroed (ties in magnitude: the lower flat index is kept); written in place."""

    n = delta.numel()
    if density >= 1 or n == 0:
        return delta
    k = max(1, int(density * n))
    flat = delta.reshape(-1)
    mag = flat.abs()
    threshold = mag.kthvalue(n - k + 1).values  # the k-th largest magnitude
    keep = mag > threshold
    ties = mag == threshold
    room = k - int(keep.sum())
    keep |= ties & (ties.cumsum(0) <= room)
    del mag, ties
    flat.mul_(keep)
    return flat.reshape(delta.shape)


def drop(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: each entry of ``delta`` kept with probability ``density`` and divided by it, the
    rest zeroed; the mask is ``torch.rand(shape, generator=generator) < density`` (float32).
    Written in place. A density of 1 keeps every entry and draws nothing."""
    import torch

    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    return delta.mul_(keep).div_(density)
