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
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from ckptsurgery.errors import CheckpointError
from ckptsurgery.io import Checkpoint, TensorDictSource, open_checkpoint
from ckptsurgery.render.tables import count

if TYPE_CHECKING:
    import torch

    from ckptsurgery.rules import Rules

__all__ = [
    "STATS",
    "BlockDiff",
    "TensorDiff",
    "Tolerance",
    "ValueDiff",
    "block_of",
    "compare",
]

# Elements widened to float64 at a time: 8 MiB per side and per temporary.
CHUNK = 1 << 20

# The statistics a table may be sorted by, each with its "worst first" direction.
STATS: dict[str, bool] = {  # name -> descending
    "max_abs": True,
    "rel_l2": True,
    "cosine": False,
    "nan": True,
    "inf": True,
    "numel": True,
    "outside": True,
}


@dataclass(frozen=True)
class Tolerance:
    """What makes a value diff a check: the assert_close rule, or bit equality."""

    atol: float = 0.0
    rtol: float = 0.0
    bit_equal: bool = False
    equal_nan: bool = False

    def describe(self) -> str:
        if self.bit_equal:
            return "bit-equal"
        return f"atol={self.atol:g}, rtol={self.rtol:g}" + (", equal_nan" if self.equal_nan else "")


@dataclass(frozen=True)
class _Sums:
    """What adds up across tensors: squared norms, the dot product, counts, maxima."""

    numel: int = 0
    sq_diff: float = 0.0
    sq_a: float = 0.0
    sq_b: float = 0.0
    dot: float = 0.0
    max_abs: float = 0.0
    nan_a: int = 0
    nan_b: int = 0
    inf_a: int = 0
    inf_b: int = 0
    outside: int = 0
    worst_ratio: float = 0.0

    def __add__(self, o: _Sums) -> _Sums:
        return _Sums(
            self.numel + o.numel,
            self.sq_diff + o.sq_diff,
            self.sq_a + o.sq_a,
            self.sq_b + o.sq_b,
            self.dot + o.dot,
            max(self.max_abs, o.max_abs),
            self.nan_a + o.nan_a,
            self.nan_b + o.nan_b,
            self.inf_a + o.inf_a,
            self.inf_b + o.inf_b,
            self.outside + o.outside,
            max(self.worst_ratio, o.worst_ratio),
        )

    @property
    def rel_l2(self) -> float:
        if self.sq_b > 0:
            return math.sqrt(self.sq_diff) / math.sqrt(self.sq_b)
        return 0.0 if self.sq_diff == 0 else math.inf

    @property
    def cosine(self) -> float | None:
        if self.sq_a > 0 and self.sq_b > 0:
            return max(-1.0, min(1.0, self.dot / (math.sqrt(self.sq_a) * math.sqrt(self.sq_b))))
        return None  # undefined for a zero vector


def _finite(x: float | None) -> float | None:
    """A float for JSON: None stands for what strict JSON cannot write (inf, nan)."""
    return x if x is not None and math.isfinite(x) else None


@dataclass(frozen=True)
class TensorDiff:
    """One tensor pair. ``name`` is B's name (A's after the rules); ``a_name`` A's own."""

    name: str
    a_name: str
    block: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    bit_equal: bool
    sums: _Sums = field(repr=False)
    passed: bool = True  # within the tolerance (True when there is none)

    @property
    def compared(self) -> bool:
        """Values were compared (the shapes agree)."""
        return self.shape_a == self.shape_b

    @property
    def numel(self) -> int:
        return self.sums.numel

    @property
    def max_abs(self) -> float | None:
        return self.sums.max_abs if self.compared else None

    @property
    def rel_l2(self) -> float | None:
        return self.sums.rel_l2 if self.compared else None

    @property
    def cosine(self) -> float | None:
        return self.sums.cosine if self.compared else None

    def stat(self, name: str) -> float | None:
        """The statistic ``name`` (a key of :data:`STATS`), for sorting."""
        s = self.sums
        if name == "nan":
            return float(s.nan_a + s.nan_b)
        if name == "inf":
            return float(s.inf_a + s.inf_b)
        if name in ("numel", "outside"):
            return float(getattr(s, name))
        value: float | None = getattr(self, name)
        return value

    def notes(self) -> list[str]:
        out = []
        if self.dtype_a != self.dtype_b:
            out.append(f"dtype {self.dtype_a} -> {self.dtype_b}")
        if not self.compared:
            out.append(f"shape {list(self.shape_a)} vs {list(self.shape_b)}: not compared")
        if self.a_name != self.name:
            out.append(f"A: {self.a_name}")
        return out

    def to_json(self) -> dict[str, Any]:
        s = self.sums
        return {
            "key": self.name,
            "a_key": self.a_name,
            "block": self.block,
            "shape_a": list(self.shape_a),
            "shape_b": list(self.shape_b),
            "dtype_a": self.dtype_a,
            "dtype_b": self.dtype_b,
            "numel": s.numel,
            "compared": self.compared,
            "bit_equal": self.bit_equal,
            "max_abs": _finite(self.max_abs),
            "rel_l2": _finite(self.rel_l2),
            "cosine": _finite(self.cosine),
            "norm_a": math.sqrt(s.sq_a),
            "norm_b": math.sqrt(s.sq_b),
            "norm_diff": math.sqrt(s.sq_diff),
            "nan_a": s.nan_a,
            "nan_b": s.nan_b,
            "inf_a": s.inf_a,
            "inf_b": s.inf_b,
            "outside": s.outside,
            "worst_ratio": _finite(s.worst_ratio),
            "passed": self.passed,
        }


@dataclass(frozen=True)
class BlockDiff:
    """A block's (or the whole checkpoint's) statistics: the sums of its tensors'."""

    name: str
    tensors: int
    bit_equal: int  # how many of them are
    failed: int  # how many are outside the tolerance
    not_compared: int  # shapes differ
    sums: _Sums = field(repr=False)

    @property
    def max_abs(self) -> float:
        return self.sums.max_abs

    @property
    def rel_l2(self) -> float:
        return self.sums.rel_l2

    @property
    def cosine(self) -> float | None:
        return self.sums.cosine

    def to_json(self) -> dict[str, Any]:
        s = self.sums
        return {
            "block": self.name,
            "tensors": self.tensors,
            "numel": s.numel,
            "bit_equal": self.bit_equal,
            "failed": self.failed,
            "not_compared": self.not_compared,
            "max_abs": _finite(s.max_abs),
            "rel_l2": _finite(s.rel_l2),
            "cosine": _finite(s.cosine),
            "nan_a": s.nan_a,
            "nan_b": s.nan_b,
            "inf_a": s.inf_a,
            "inf_b": s.inf_b,
        }


@dataclass(frozen=True)
class ValueDiff:
    """The value diff of checkpoint A against the reference B; see the module docstring."""

    a: str
    b: str
    tensors: tuple[TensorDiff, ...]
    blocks: tuple[BlockDiff, ...]  # in model order
    overall: BlockDiff
    only_in_a: tuple[str, ...]  # A's keys (after the rules) that B lacks: "unexpected"
    only_in_b: tuple[str, ...]  # B's keys that A lacks: "missing"
    allowed_only_in_a: tuple[str, ...] = ()
    allowed_only_in_b: tuple[str, ...] = ()
    tolerance: Tolerance | None = None

    @property
    def checked(self) -> bool:
        return self.tolerance is not None

    @property
    def failures(self) -> list[TensorDiff]:
        """The tensors outside the tolerance, worst first."""
        return sorted((t for t in self.tensors if not t.passed), key=_badness, reverse=True)

    @property
    def unpaired(self) -> list[str]:
        """Keys without a pair that no allow glob covers (a check fails on them)."""
        allowed = {*self.allowed_only_in_a, *self.allowed_only_in_b}
        return [k for k in (*self.only_in_a, *self.only_in_b) if k not in allowed]

    @property
    def passed(self) -> bool:
        """Every tensor within the tolerance and every key paired; True without a check."""
        if self.tolerance is None:
            return True
        return not self.failures and not self.unpaired

    def sorted_tensors(self, by: str | None = None, top: int | None = None) -> list[TensorDiff]:
        """The tensors in model order, or by the statistic ``by``, worst first; ``top`` first."""
        rows = list(self.tensors)
        if by is not None:
            if by not in STATS:
                raise ValueError(f"unknown statistic {by!r}; use one of {', '.join(STATS)}")
            descending = STATS[by]

            def key(t: TensorDiff) -> tuple[int, float]:
                v = t.stat(by)
                if v is None or math.isnan(v):
                    return (1, 0.0)  # not compared: last
                return (0, -v if descending else v)

            rows.sort(key=key)
        return rows if top is None else rows[:top]

    def summary(self) -> str:
        o = self.overall
        parts = [
            f"{count(o.tensors, 'tensor')} compared",
            f"{o.bit_equal} bit-equal",
            f"max |a-b| {_num(o.max_abs)}",
            f"relative L2 {_num(o.rel_l2)}",
            f"cosine {_num(o.cosine, cos=True)}",
        ]
        if o.not_compared:
            parts.append(f"{o.not_compared} not compared (shapes differ)")
        dtypes = sum(t.dtype_a != t.dtype_b for t in self.tensors)
        if dtypes:
            parts.append(f"{dtypes} with another dtype")
        s = o.sums
        if s.nan_a or s.nan_b or s.inf_a or s.inf_b:
            parts.append(f"NaN {s.nan_a}/{s.nan_b}, Inf {s.inf_a}/{s.inf_b} (A/B)")
        if self.only_in_a:
            parts.append(f"{len(self.only_in_a)} only in A")
        if self.only_in_b:
            parts.append(f"{len(self.only_in_b)} only in B")
        text = "; ".join(parts)
        if self.tolerance is not None:
            verdict = "PASSED" if self.passed else "FAILED"
            text += (
                f"\ncheck ({self.tolerance.describe()}): {count(len(self.failures), 'tensor')} outside"
                + (f", {len(self.unpaired)} keys unpaired" if self.unpaired else "")
                + f" -> {verdict}"
            )
        return text

    def table(self, *, fmt: str = "simple", sort: str | None = None, top: int | None = None) -> str:
        """The human report: the blocks, the tensors (sorted, ``top`` first), the summary."""
        from ckptsurgery.keygroups import group_keys
        from ckptsurgery.render.tables import table

        check = self.tolerance is not None
        head = ["max |a-b|", "rel L2", "cosine", "NaN A/B", "Inf A/B"]
        block_rows = [
            (
                b.name,
                f"{b.tensors}",
                f"{b.bit_equal}",
                _num(b.max_abs),
                _num(b.rel_l2),
                _num(b.cosine, cos=True),
                f"{b.sums.nan_a}/{b.sums.nan_b}",
                f"{b.sums.inf_a}/{b.sums.inf_b}",
                *([f"{b.failed}"] if check else []),
            )
            for b in (*self.blocks, self.overall)
        ]
        sections = [
            table(
                block_rows,
                ("block", "tensors", "bit-equal", *head, *(["failed"] if check else [])),
                fmt=fmt,
            )
        ]
        rows = self.sorted_tensors(sort, top)
        tensor_rows = [
            (
                t.name,
                t.dtype_a if t.dtype_a == t.dtype_b else f"{t.dtype_a}/{t.dtype_b}",
                "yes" if t.bit_equal else "no",
                _num(t.max_abs),
                _num(t.rel_l2),
                _num(t.cosine, cos=True),
                f"{t.sums.nan_a}/{t.sums.nan_b}",
                f"{t.sums.inf_a}/{t.sums.inf_b}",
                *([("ok" if t.passed else "FAIL")] if check else []),
                "; ".join(t.notes()),
            )
            for t in rows
        ]
        shown = f" ({len(rows)} of {len(self.tensors)}" + (f", by {sort})" if sort else ")")
        sections.append(
            ("tensors" + (shown if len(rows) < len(self.tensors) or sort else "") + ":\n")
            + table(
                tensor_rows,
                ("key", "dtype", "bit-equal", *head, *(["check"] if check else []), "note"),
                fmt=fmt,
            )
        )
        for title, keys in (("only in A", self.only_in_a), ("only in B", self.only_in_b)):
            if keys:
                sections.append(
                    f"{title} ({len(keys)}):\n" + "\n".join("  " + g for g in group_keys(keys))
                )
        sections.append(self.summary())
        return "\n\n".join(sections)

    def __str__(self) -> str:
        return self.table()

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "tolerance": None
            if self.tolerance is None
            else {
                "atol": self.tolerance.atol,
                "rtol": self.tolerance.rtol,
                "bit_equal": self.tolerance.bit_equal,
                "equal_nan": self.tolerance.equal_nan,
            },
            "passed": self.passed,
            "overall": self.overall.to_json(),
            "blocks": [b.to_json() for b in self.blocks],
            "tensors": [t.to_json() for t in self.tensors],
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
            "failures": [t.name for t in self.failures],
            "unpaired": self.unpaired,
        }


def _badness(t: TensorDiff) -> tuple[float, float]:
    ratio = t.sums.worst_ratio if not math.isnan(t.sums.worst_ratio) else math.inf
    rel = t.rel_l2 if t.rel_l2 is not None else math.inf
    return (ratio if t.compared else math.inf, rel)


def _num(x: float | None, *, cos: bool = False) -> str:
    if x is None:
        return "-"
    if x == 0 or (cos and x == 1):
        return f"{x:g}"
    if cos and x > 0.999:
        return f"{x:.9f}"  # 1 - 1e-9 still shows
    return f"{x:.3g}"


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


def pair_sums(a: torch.Tensor, b: torch.Tensor, tolerance: Tolerance | None = None) -> _Sums:
    """The sums of one tensor pair of equal shape, in float64, :data:`CHUNK` at a time."""
    import torch

    complex_ = a.is_complex() or b.is_complex()
    x_all, y_all = _flat64(a, complex_), _flat64(b, complex_)
    tol = tolerance if tolerance is not None and not tolerance.bit_equal else None
    total = _Sums(numel=a.numel())
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
            total = total + _Sums(
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
            # in place: d and y are not needed any more
            ratio = d.abs_().div_(y.abs_().mul_(tol.rtol).add_(tol.atol))
            ratio = torch.nan_to_num(ratio, nan=0.0)  # 0 / 0: equal where nothing is allowed
            outside += int((ratio > 1).sum())
            worst = max(worst, float(ratio.max()))
        total = total + _Sums(
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
        in_b = set(cb.infos)
        paired = [(old, new) for old, new in pairs if new in in_b]
        new_names = {new for _, new in pairs}
        only_a = tuple(new for _, new in pairs if new not in in_b)
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
        sums = _Sums(numel=max(ia.numel, ib.numel), nan_a=sa.nan_a, inf_a=sa.inf_a,
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
    sums = _Sums()
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
