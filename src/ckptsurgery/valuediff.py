"""The value of a value diff (:func:`ckptsurgery.compare.compare`): per tensor, per block
and overall statistics, the check's verdict, a table, JSON and a readable ``str``.

Every statistic is derived from sums that add up across tensors (:class:`Sums`: squared
norms, the dot product, counts, maxima), so that a block's and the whole checkpoint's numbers
are exact aggregates, not averages of ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ckptsurgery.render.tables import count

__all__ = ["STATS", "BlockDiff", "Sums", "TensorDiff", "Tolerance", "ValueDiff"]

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
class Sums:
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

    def __add__(self, o: Sums) -> Sums:
        return Sums(
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
    sums: Sums = field(repr=False)
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
    sums: Sums = field(repr=False)

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
