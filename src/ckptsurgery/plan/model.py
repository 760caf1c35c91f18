"""A surgery as a value: the output's tensors, each made by one operation from source tensors.

A :class:`Plan` is built from headers alone (names, shapes, dtypes; see
:mod:`ckptsurgery.plan.build`), so it can be printed, matched against a model, gated, saved in
a recipe and recorded in the output's provenance before any tensor byte is read. The one
executor (:mod:`ckptsurgery.plan.execute`) then carries it out, one output tensor at a time.

Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ckptsurgery._types import PathLike
from ckptsurgery.io.dtypes import TensorInfo
from ckptsurgery.keygroups import group_keys
from ckptsurgery.rules import KeyPlan, Rules

__all__ = ["Conflict", "Entry", "Op", "Plan", "Ref", "SourcePart", "SourceSpec"]

MODES = ("remap", "union", "average", "method")
# The merge methods of mode "method" (ckptsurgery.plan.methods), each an op of that name.
METHOD_OPS = ("task-arithmetic", "ties", "dare-linear", "dare-ties")


@dataclass(frozen=True)
class SourceSpec:
    """One input of a surgery: a checkpoint path, its nested state dict and its own rules."""

    path: PathLike
    key: str | None = None
    rules: Rules = field(default_factory=Rules)


@dataclass(frozen=True)
class Op:
    """An operation and its parameters, as data: ``Op("cast", (("dtype", "bfloat16"),))``.

    Parameters are a tuple of pairs so that an op is hashable (two outputs made by the same op
    from the same stored tensor stay tied).
    """

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def is_copy(self) -> bool:
        return self.name == "copy"

    def param(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)

    def describe(self) -> str:
        """``copy``, ``cast ->bfloat16``, ``mean of 3``, ``weighted-sum 0.5, 0.3, 0.2``,
        ``rows 10 of 1000``, ``in-chans 3->1``, ``resample-pos-embed 14x14->24x24``,
        ``lora-fold r=16 scale=2.0``."""
        if self.name == "cast":
            return f"cast ->{self.param('dtype')}"
        if self.name in ("mean", "weighted-sum"):
            weights = self.param("weights", ())
            text = (
                f"mean of {len(weights)}"
                if self.name == "mean"
                else f"weighted-sum {', '.join(f'{w:.4g}' for w in weights)}"
            )
            dtype = self.param("dtype")
            return f"{text} ->{dtype}" if dtype else text
        if self.name in METHOD_OPS:
            return _describe_method(self)
        text = self.name
        if self.name == "rows":
            text = f"rows {len(self.param('indices'))} of {self.param('of')}"
        elif self.name == "in-chans":
            text = f"in-chans {self.param('base_chans')}->{self.param('channels')}"
        elif self.name == "resample-pos-embed":
            (h, w), (h2, w2) = self.param("old_size"), self.param("size")
            text = f"resample-pos-embed {h}x{w}->{h2}x{w2}"
        elif self.name == "lora-fold":  # lora-fold r=16 scale=2.0 (conv)
            scale = f"{self.param('scale'):.6g}"
            scale += "" if any(c in scale for c in ".en") else ".0"
            text = f"lora-fold r={self.param('r')} scale={scale}"
            kind = self.param("kind")
            text += "" if kind == "linear" else f" ({kind})"
            text += " fan-in-fan-out" if self.param("fan_in_fan_out") else ""
        dtype = self.param("dtype")
        return f"{text} ->{dtype}" if dtype else text

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.name,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in self.params},
        }


COPY = Op("copy")


def _describe_method(op: Op) -> str:
    """``ties density=0.5``, ``dare-ties density=0.3 seed=0 weights=1, 0.5 lambda=0.8``:
    the parameters that differ from 1 (or from the method's normalisation)."""
    parts = [op.name]
    if op.param("density") is not None:
        parts.append(f"density={op.param('density'):.4g}")
    if op.param("seed") is not None:
        parts.append(f"seed={op.param('seed')}")
    weights = op.param("weights", ())
    if any(w != 1 for w in weights):
        parts.append(f"weights={', '.join(f'{w:.4g}' for w in weights)}")
    if op.param("lambda", 1.0) != 1:
        parts.append(f"lambda={op.param('lambda'):.4g}")
    if op.param("normalize") != (op.name == "ties"):
        parts.append("normalize" if op.param("normalize") else "no-normalize")
    dtype = op.param("dtype")
    return " ".join(parts) + (f" ->{dtype}" if dtype else "")


@dataclass(frozen=True)
class Ref:
    """A tensor of one source: the source's index in the plan and its name there."""

    source: int
    key: str


@dataclass(frozen=True)
class Entry:
    """One output tensor: its name and facts, and the operation that makes it from ``inputs``
    (whose facts are ``input_infos``, in the same order).

    ``compare``: other sources' versions of a tensor that is copied from the first (an
    average's integer tensors); they are compared while writing and a difference is reported.
    """

    name: str
    info: TensorInfo
    op: Op
    inputs: tuple[Ref, ...]
    input_infos: tuple[TensorInfo, ...]
    compare: tuple[Ref, ...] = ()

    @property
    def source_dtype(self) -> str:
        return self.input_infos[0].dtype

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.name,
            "shape": list(self.info.shape),
            "dtype": self.info.dtype,
            "bytes": self.info.nbytes,
            **self.op.to_json(),
            "sources": [{"source": r.source, "key": r.key} for r in self.inputs],
        }


@dataclass(frozen=True)
class SourcePart:
    """What one source brings to a plan: where its state dict was found and its rules' effect."""

    path: str
    key: str | None  # the nested state dict's path inside the file
    format: str
    tensors: int  # tensors in its state dict
    bytes: int  # their bytes (tied tensors once)
    rules: Rules
    keys: KeyPlan  # its rules' effect: (old, new) names kept, dropped, rule counts
    other_entries: dict[str, str] = field(default_factory=dict)
    taken: int = 0  # output tensors made from it
    role: str = "source"  # or "lora": a LoRA adapter folded into the others' tensors


@dataclass(frozen=True)
class Conflict:
    """A key that several sources hold (indices into the sources), and the one it came from."""

    key: str
    sources: tuple[int, ...]
    taken_from: int


@dataclass(frozen=True)
class Plan:
    """Every output tensor in order, how each is made, and the sources they come from.

    ``mode`` says how the sources are combined: ``remap`` (one source), ``union`` (the keys
    of all; ``conflicts`` resolved by ``on_conflict``), ``average`` (the weighted mean of
    every floating tensor) or ``method`` (the fine-tunes merged into the base, source 0, by
    ``method``: task arithmetic, TIES or DARE; see :mod:`ckptsurgery.plan.methods`).
    ``ties`` maps an output name to the output name whose data it shares (stored once).
    ``dtype`` / ``keep_dtype``: the cast asked for, and the globs it spared.
    """

    mode: str
    sources: tuple[SourcePart, ...]
    entries: tuple[Entry, ...]
    ties: Mapping[str, str] = field(default_factory=dict)
    on_conflict: str = "error"
    conflicts: tuple[Conflict, ...] = ()
    weights: tuple[float, ...] | None = None  # normalised (average only)
    dtype: str | None = None
    keep_dtype: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    method: Op | None = None  # mode "method": the method and its parameters (no dtype)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return {e.name: e.info for e in self.entries}

    @property
    def dropped(self) -> tuple[str, ...]:
        """Source keys left out by the rules (or the gate), over every source."""
        return tuple(k for s in self.sources for k in s.keys.dropped)

    @property
    def total_bytes(self) -> int:
        """Tensor bytes the output will hold (tied tensors once)."""
        return sum(e.info.nbytes for e in self.entries if e.name not in self.ties)

    @property
    def input_bytes(self) -> int:
        """Bytes of source tensors read to make the output (tied tensors once)."""
        return sum(
            sum(i.nbytes for i in e.input_infos) for e in self.entries if e.name not in self.ties
        )

    @property
    def cast(self) -> list[Entry]:
        """The entries whose dtype differs from their source's (a cast, or a mean stored in
        another dtype)."""
        return [e for e in self.entries if e.op.param("dtype") is not None]

    @property
    def bytes_saved(self) -> int:
        """Bytes the casts save (negative when they widen); a shape adapter's change of size
        is not counted."""
        return sum(
            e.info.numel * _itemsize(e.input_infos[0]) - e.info.nbytes
            for e in self.cast
            if e.name not in self.ties
        )

    def op_groups(self) -> list[dict[str, Any]]:
        """The operations, each with its count and key groups: what the dry run summarises and
        the provenance records."""
        by_op: dict[tuple[str, Op], list[str]] = {}
        for e in self.entries:
            by_op.setdefault((e.source_dtype, e.op), []).append(e.name)
        out = []
        for (src, op), keys in by_op.items():
            group = op.to_json()
            if op.param("dtype") is not None:
                group["from"] = src
            group.update(count=len(keys), keys=group_keys(keys))
            out.append(group)
        return out

    def without(self, names: Iterable[str], *, reason: str) -> Plan:
        """This plan with the outputs ``names`` left out (counted as ``reason`` in the rules'
        effect of the sources they came from)."""
        gone = set(names)
        if not gone:
            return self
        entries = tuple(e for e in self.entries if e.name not in gone)
        sources = []
        for j, s in enumerate(self.sources):
            mine = {e.name for e in self.entries if e.name in gone and _uses(e, j)}
            sources.append(
                replace(
                    s,
                    keys=s.keys.without(_new_names(s.keys, mine), reason=reason)
                    if mine
                    else s.keys,
                    taken=sum(1 for e in entries if _uses(e, j)),
                )
            )
        ties = {a: c for a, c in self.ties.items() if a not in gone and c not in gone}
        # An alias whose stored partner left becomes the one that stores the data.
        orphans = {a: c for a, c in self.ties.items() if a not in gone and c in gone}
        heads: dict[str, str] = {}
        for alias, head in orphans.items():
            heads.setdefault(head, alias)
            if heads[head] != alias:
                ties[alias] = heads[head]
        return replace(self, entries=entries, sources=tuple(sources), ties=ties)

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON: every entry with its operation and bytes, and the totals."""
        return {
            "mode": self.mode,
            "entries": [
                {**e.to_json(), **({"tied_to": self.ties[e.name]} if e.name in self.ties else {})}
                for e in self.entries
            ],
            "ops": self.op_groups(),
            "tensors": len(self.entries),
            "total_bytes": self.total_bytes,
            "input_bytes": self.input_bytes,
            "bytes_saved": self.bytes_saved,
            "dtype": self.dtype,
            "keep_dtype": list(self.keep_dtype),
        }

    def label(self, ref: Ref) -> str:
        """A source tensor as shown in tables: its key, prefixed by ``#i`` with several sources."""
        return ref.key if len(self.sources) == 1 else f"#{ref.source + 1} {ref.key}"


def _itemsize(info: TensorInfo) -> int:
    return info.nbytes // info.numel if info.numel else 0


def _uses(e: Entry, source: int) -> bool:
    return any(r.source == source for r in e.inputs)


def _new_names(keys: KeyPlan, new: set[str]) -> list[str]:
    return [n for _, n in keys.renames if n in new]
