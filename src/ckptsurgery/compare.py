"""Value diff: did the values of a checkpoint survive, and where did a model change?

:func:`compare` pairs the tensors of two checkpoints by name (after optional :class:`Rules` on
the first) and computes, for each pair, one tensor pair in memory at a time:

- ``max_abs``: the largest ``|a - b|``;
- ``rel_l2``: ``‖a - b‖ / ‖b‖`` (B is the reference);
- ``cosine``: ``a·b / (‖a‖ ‖b‖)``;
- ``bit_equal``: same dtype, same shape, same bytes (NaN payloads and -0.0 included);
- NaN and Inf counts on each side.

Values are widened to float64 a chunk at a time (:data:`CHUNK` elements), so bfloat16 and
float16 give honest numbers and the extra memory stays a few tens of MB whatever the tensor
size; the differences and norms are taken over the positions where both sides are finite.
Dtype differences are reported and compared by value; shape differences are reported and
not compared. The same sums, added up, give a summary per block (see :func:`block_of`) and
for the whole checkpoint.

With a tolerance (``atol``/``rtol``, the :func:`torch.testing.assert_close` rule
``|a - b| <= atol + rtol * |b|`` elementwise, NaN never close unless ``equal_nan``) or
``bit_equal=True``, the diff is a check: :attr:`ValueDiff.passed` says whether every tensor
is within it and every key has its pair (or is allowed to lack one).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from ckptsurgery.errors import CheckpointError
from ckptsurgery.io import Checkpoint, TensorDictSource, open_checkpoint
from ckptsurgery.valuediff import BlockDiff, Sums, TensorDiff, Tolerance, ValueDiff

if TYPE_CHECKING:
    import torch

    from ckptsurgery.rules import Rules

__all__ = ["BlockDiff", "TensorDiff", "Tolerance", "ValueDiff", "block_of", "compare"]

# Elements widened to float64 at a time: 8 MiB per side and per temporary.
CHUNK = 1 << 20

# -- blocks ---------------------------------------------------------------------------------

_NUMBER = re.compile(r"[0-9]+")


def block_of(name: str, depth: int | None = None) -> str:
    """The block a key belongs to: its first ``depth`` dotted parts (as ``inspect --depth``),
    or by default its parts up to the first number (``blocks.3``, ``model.layers.0``,
    ``layer1.0``), else its module (``patch_embed.proj``, ``fc``), else the key itself."""
    parts = name.split(".")
    if depth is not None:
        return ".".join(parts[:depth])
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else name


def model_order(blocks: Sequence[str]) -> list[str]:
    """``blocks`` in first-seen order, numbered ones of one stem renumbered in their places:
    a file sorted by name (``blocks.0, blocks.1, blocks.10, blocks.2``) gives back
    ``blocks.0, blocks.1, blocks.2, blocks.10``."""
    by_stem: dict[str, list[int]] = {}
    for i, b in enumerate(blocks):
        by_stem.setdefault(_NUMBER.sub("#", b), []).append(i)
    out = list(blocks)
    for positions in by_stem.values():
        ordered = sorted(
            (blocks[i] for i in positions), key=lambda b: [int(n) for n in _NUMBER.findall(b)]
        )
        for i, b in zip(positions, ordered, strict=True):
            out[i] = b
    return out


# -- the statistics ---------------------------------------------------------------------------


def _flat64(t: torch.Tensor, complex_: bool) -> torch.Tensor:
    """``t`` flattened, as float64 (complex as interleaved real and imaginary parts), as a
    view where possible; the widening happens per chunk."""
    import torch

    flat = t.reshape(-1)
    if complex_:
        return torch.view_as_real(flat.to(torch.complex128)).reshape(-1)
    return flat


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    x = a.contiguous().reshape(-1).view(torch.uint8)
    y = b.contiguous().reshape(-1).view(torch.uint8)
    return bool(torch.equal(x, y))


def pair_sums(a: torch.Tensor, b: torch.Tensor, tolerance: Tolerance | None = None) -> Sums:
    """The sums of one tensor pair of equal shape, in float64, :data:`CHUNK` at a time."""
    import torch

    complex_ = a.is_complex() or b.is_complex()
    x_all, y_all = _flat64(a, complex_), _flat64(b, complex_)
    tol = tolerance if tolerance is not None and not tolerance.bit_equal else None
    total = Sums(numel=a.numel())
    for start in range(0, x_all.numel(), CHUNK):
        x = x_all[start : start + CHUNK].to(torch.float64)
        y = y_all[start : start + CHUNK].to(torch.float64)
        sq_a, sq_b = float(torch.dot(x, x)), float(torch.dot(y, y))
        nan_a = nan_b = inf_a = inf_b = unequal = 0
        if not (math.isfinite(sq_a) and math.isfinite(sq_b)):
            # Only a chunk holding a NaN or an Inf (or squares past float64's range) comes
            # here: count them, and compare the positions where both sides are finite.
            nan_a, nan_b = int(x.isnan().sum()), int(y.isnan().sum())
            inf_a, inf_b = int(x.isinf().sum()), int(y.isinf().sum())
            finite = x.isfinite() & y.isfinite()
            if tol is not None:
                # assert_close: an Inf must meet the same Inf; NaN only NaN, with equal_nan
                same = x == y
                if tol.equal_nan:
                    same |= x.isnan() & y.isnan()
                unequal = int((~finite & ~same).sum())
            x, y = x[finite], y[finite]
            sq_a, sq_b = float(torch.dot(x, x)), float(torch.dot(y, y))
        if not x.numel():
            total = total + Sums(
                nan_a=nan_a,
                nan_b=nan_b,
                inf_a=inf_a,
                inf_b=inf_b,
                outside=unequal,
                worst_ratio=math.inf if unequal else 0.0,
            )
            continue
        d = x - y
        lo, hi = torch.aminmax(d)
        sq_diff, dot = float(torch.dot(d, d)), float(torch.dot(x, y))
        outside, worst = unequal, (math.inf if unequal else 0.0)
        if tol is not None:
            # d in place (not needed any more); y may be the caller's own float64 tensor
            ratio = d.abs_().div_(y.abs().mul_(tol.rtol).add_(tol.atol))
            ratio = torch.nan_to_num(ratio, nan=0.0)  # 0 / 0: equal where nothing is allowed
            outside += int((ratio > 1).sum())
            worst = max(worst, float(ratio.max()))
        total = total + Sums(
            sq_diff=sq_diff,
            sq_a=sq_a,
            sq_b=sq_b,
            dot=dot,
            max_abs=max(-float(lo), float(hi)),
            nan_a=nan_a,
            nan_b=nan_b,
            inf_a=inf_a,
            inf_b=inf_b,
            outside=outside,
            worst_ratio=worst,
        )
    return total


# -- compare ----------------------------------------------------------------------------------


def compare(
    a: str | os.PathLike[str] | Checkpoint | Mapping[str, torch.Tensor],
    b: str | os.PathLike[str] | Checkpoint | Mapping[str, torch.Tensor],
    *,
    key: str | None = None,
    b_key: str | None = None,
    rules: Rules | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    bit_equal: bool = False,
    equal_nan: bool = False,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    depth: int | None = None,
    allow_globals: tuple[str, ...] | list[str] = (),
    unsafe_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ValueDiff:
    """The value diff of ``a`` against the reference ``b``; see the module docstring.

    ``a`` and ``b`` are paths (any supported checkpoint; ``key`` / ``b_key`` select their
    state dicts), opened :class:`Checkpoint` objects, or state dicts. ``rules`` rename A's
    keys before pairing. ``atol`` / ``rtol`` (either alone: the other is 0) or ``bit_equal``
    make it a check (:attr:`ValueDiff.passed`); ``allow_missing`` / ``allow_unexpected``
    (globs) excuse keys only B / only A holds. Tensors are read one pair at a time;
    ``progress(done, total)`` is called with the bytes read so far.
    """
    if (atol is not None and atol < 0) or (rtol is not None and rtol < 0):
        raise CheckpointError("atol and rtol must not be negative")
    tolerance = None
    if bit_equal or atol is not None or rtol is not None:
        tolerance = Tolerance(atol or 0.0, rtol or 0.0, bit_equal, equal_nan)
    trust = {"allow_globals": tuple(allow_globals), "unsafe_pickle": unsafe_pickle}
    with _opened(a, key, trust) as ca, _opened(b, b_key, trust) as cb:
        names = list(ca.infos)
        pairs = rules.plan(names).renames if rules is not None else tuple((n, n) for n in names)
        position = {n: i for i, n in enumerate(cb.infos)}
        paired = [(old, new) for old, new in pairs if new in position]
        if _sorted_by_name(ca) and not _sorted_by_name(cb):
            paired.sort(key=lambda p: position[p[1]])  # B keeps the model's order
        new_names = {new for _, new in pairs}
        only_a = tuple(new for _, new in pairs if new not in position)
        only_b = tuple(n for n in cb.infos if n not in new_names)
        total = sum(ca.infos[o].nbytes + cb.infos[n].nbytes for o, n in paired)
        done = 0
        tensors: list[TensorDiff] = []
        seen: dict[tuple[str, str], TensorDiff] = {}  # tied pairs are read once
        for old, new in paired:
            ia, ib = ca.infos[old], cb.infos[new]
            ident = (ca.canonical(old), cb.canonical(new))
            if ident in seen:
                t = replace(seen[ident], name=new, a_name=old, block=block_of(new, depth))
            else:
                t = _tensor_diff(ca, cb, old, new, block_of(new, depth), tolerance)
                seen[ident] = t
                done += ia.nbytes + ib.nbytes
            tensors.append(t)
            if progress is not None:
                progress(done, total)
    return _assemble(
        str(_label(a)),
        str(_label(b)),
        tensors,
        only_a,
        only_b,
        tolerance,
        allow_missing=tuple(allow_missing),
        allow_unexpected=tuple(allow_unexpected),
    )


def _tensor_diff(
    ca: Checkpoint, cb: Checkpoint, old: str, new: str, block: str, tol: Tolerance | None
) -> TensorDiff:
    ia, ib = ca.infos[old], cb.infos[new]
    x, y = ca.tensor(old), cb.tensor(new)
    equal = _bytes_equal(x, y)
    if ia.shape == ib.shape:
        sums = pair_sums(x, y, tol)
    else:  # not compared; still count what each side holds
        sa, sb = pair_sums(x, x), pair_sums(y, y)
        sums = Sums(numel=max(ia.numel, ib.numel), nan_a=sa.nan_a, inf_a=sa.inf_a,
                     nan_b=sb.nan_b, inf_b=sb.inf_b)  # fmt: skip
    passed = True
    if tol is not None:
        passed = equal if tol.bit_equal else ia.shape == ib.shape and sums.outside == 0
    return TensorDiff(new, old, block, ia.shape, ib.shape, ia.dtype, ib.dtype, equal, sums, passed)


def _assemble(
    a: str,
    b: str,
    tensors: list[TensorDiff],
    only_a: tuple[str, ...],
    only_b: tuple[str, ...],
    tolerance: Tolerance | None,
    *,
    allow_missing: tuple[str, ...],
    allow_unexpected: tuple[str, ...],
) -> ValueDiff:
    by_block: dict[str, list[TensorDiff]] = {}
    for t in tensors:
        by_block.setdefault(t.block, []).append(t)
    blocks = tuple(_block(name, by_block[name]) for name in model_order(list(by_block)))
    return ValueDiff(
        a,
        b,
        tuple(tensors),
        blocks,
        _block("(all)", tensors),
        only_a,
        only_b,
        allowed_only_in_a=tuple(k for k in only_a if _any_match(k, allow_unexpected)),
        allowed_only_in_b=tuple(k for k in only_b if _any_match(k, allow_missing)),
        tolerance=tolerance,
    )


def _block(name: str, tensors: Sequence[TensorDiff]) -> BlockDiff:
    sums = Sums()
    for t in tensors:
        # a pair of other shapes adds its NaN/Inf counts, not its (meaningless) norms
        sums = sums + (t.sums if t.compared else replace(t.sums, numel=0))
    return BlockDiff(
        name,
        len(tensors),
        sum(t.bit_equal for t in tensors),
        sum(not t.passed for t in tensors),
        sum(not t.compared for t in tensors),
        sums,
    )


def _sorted_by_name(ckpt: Checkpoint) -> bool:
    """safetensors writers (the reference one, Hugging Face's shards) order tensors by dtype
    and name, not as the model holds them; torch files keep the state dict's order."""
    return "safetensors" in ckpt.format


def _any_match(key: str, globs: Iterable[str]) -> bool:
    return any(fnmatchcase(key, g) for g in globs)


def _label(x: object) -> str:
    if isinstance(x, Checkpoint):
        return str(x.path)
    if isinstance(x, str | os.PathLike):
        return os.fspath(x)
    return "state dict"


class _opened:
    """A source as a :class:`Checkpoint`, closed on the way out only if opened here."""

    def __init__(self, x: object, key: str | None, trust: dict[str, Any]) -> None:
        self.owned = not isinstance(x, Checkpoint)
        if isinstance(x, Checkpoint):
            self.ckpt = x
        elif isinstance(x, str | os.PathLike):
            self.ckpt = open_checkpoint(x, key=key, **trust)
        elif isinstance(x, Mapping):
            self.ckpt = TensorDictSource(x)
        else:
            raise TypeError(f"compare: expected a path, a Checkpoint or a state dict, got {x!r}")

    def __enter__(self) -> Checkpoint:
        return self.ckpt

    def __exit__(self, *exc: object) -> None:
        if self.owned:
            self.ckpt.close()
