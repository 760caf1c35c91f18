"""Dry-run matching of a checkpoint against a model (loading: :mod:`ckptsurgery.loading`).

:func:`match` compares key names, shapes and dtypes only: a :class:`~ckptsurgery.io.Checkpoint`
is matched from its header (no tensor byte is read) and the model can live on the meta device.
The model side is ``model.state_dict()``: parameters and persistent buffers, so non-persistent
buffers are never expected and BatchNorm's ``num_batches_tracked`` is expected exactly when the
model's state dict holds it.

Every model key ends up in exactly one of ``matched``, ``missing``, ``shape_mismatch`` or
``tied_aliases``; every checkpoint key in ``matched``, ``unexpected`` or ``shape_mismatch`` (or
``dropped_mismatched``).

Decisions:

- ``allow_missing`` / ``allow_unexpected`` are fnmatch globs on the whole key (``*`` matches
  dots too). Allowed keys stay listed in ``missing`` / ``unexpected`` and are repeated in
  ``allowed_missing`` / ``allowed_unexpected``.
- A shape mismatch is never allowed by a glob: a tensor of the wrong shape cannot be loaded.
  ``drop_mismatched=True`` drops such keys from the checkpoint first; they then count as
  missing (listed in ``dropped_mismatched`` as well) and need ``allow_missing`` like any other.
- A dtype difference is informational (loading casts to the model's dtype) and never makes a
  checkpoint incompatible.
- Tied parameters (one tensor under several model names, e.g. ``lm_head.weight`` and
  ``embed.weight``): a name whose tie partner is matched is not missing; it is listed in
  ``tied_aliases``, since loading the partner fills it.
"""

from __future__ import annotations

import html
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

from ckptsurgery.errors import CheckpointError
from ckptsurgery.inputs import _Side, _side, checkpoint_input
from ckptsurgery.io import Checkpoint
from ckptsurgery.io.dtypes import TensorInfo
from ckptsurgery.keygroups import group_keys
from ckptsurgery.models import BuiltModel
from ckptsurgery.rules import Rules, UnusedPatternWarning

if TYPE_CHECKING:
    import torch
    from torch import nn

    CheckpointLike: TypeAlias = (
        Mapping[str, torch.Tensor] | Mapping[str, TensorInfo] | Checkpoint | str | os.PathLike[str]
    )

__all__ = ["DtypeMismatch", "MatchReport", "ShapeMismatch", "match"]

_MAX_IN_MESSAGE = 3  # key groups named in an exception message before "..."
_INDENT = "  "  # the lines of a report section


class ShapeMismatch(NamedTuple):
    key: str
    checkpoint: tuple[int, ...]
    model: tuple[int, ...]


class DtypeMismatch(NamedTuple):
    key: str
    checkpoint: str
    model: str


@dataclass(frozen=True, repr=False)
class MatchReport:
    """How a checkpoint fits a model; one value drives the table, the JSON and the exit code.

    Key lists follow the model's order (``unexpected``: the checkpoint's order).
    ``print(report)`` shows the table (with :meth:`notes`), a notebook renders it, and
    ``repr`` is the summary line.
    """

    matched: list[str]
    missing: list[str]
    unexpected: list[str]
    shape_mismatch: list[ShapeMismatch]
    dtype_mismatch: list[DtypeMismatch]
    allowed_missing: list[str] = field(default_factory=list)
    allowed_unexpected: list[str] = field(default_factory=list)
    tied_aliases: list[str] = field(default_factory=list)
    tied_to: dict[str, str] = field(default_factory=dict)  # tied alias -> its matched partner
    dropped_mismatched: list[ShapeMismatch] = field(default_factory=list)
    model_tensors: int = 0
    checkpoint_tensors: int = 0
    model_params: int = 0  # elements of the model's state tensors, each tied tensor once
    matched_params: int = 0
    allow_missing: tuple[str, ...] = ()
    allow_unexpected: tuple[str, ...] = ()
    unused_rules: tuple[str, ...] = ()  # rules given to match() that touched no key (CLI flags)

    def __repr__(self) -> str:
        return f"<MatchReport: {self.summary()}>"

    def __str__(self) -> str:
        return self.table(notes=True)

    def _repr_html_(self) -> str:
        """The table in a notebook, monospaced, its verdict in colour."""
        colour = "#1a7f37" if self.compatible else "#cf222e"
        verdict = "compatible" if self.compatible else "INCOMPATIBLE"
        return (
            f'<pre style="white-space: pre; line-height: 1.25">{html.escape(str(self))}</pre>'
            f'<p style="color: {colour}; font-weight: bold">{verdict}</p>'
        )

    def notes(self) -> list[str]:
        """What was asked for and did nothing: each unused rule and allow glob, one line each."""
        lines = [f"rule {r} matched no key" for r in self.unused_rules]
        for name, globs, keys in (
            ("allow_missing", self.allow_missing, self.missing),
            ("allow_unexpected", self.allow_unexpected, self.unexpected),
        ):
            lines += [f"{name} glob {g!r} matched no key" for g in globs if not _any_match(keys, g)]
        return lines

    @property
    def compatible(self) -> bool:
        """No missing, unexpected or shape-mismatched key beyond those allowed."""
        return not (self.disallowed_missing or self.disallowed_unexpected or self.shape_mismatch)

    @property
    def disallowed_missing(self) -> list[str]:
        allowed = set(self.allowed_missing)
        return [k for k in self.missing if k not in allowed]

    @property
    def disallowed_unexpected(self) -> list[str]:
        allowed = set(self.allowed_unexpected)
        return [k for k in self.unexpected if k not in allowed]

    @property
    def matched_fraction(self) -> float:
        """Share of the model's elements that the checkpoint provides (1.0 for an empty model)."""
        return self.matched_params / self.model_params if self.model_params else 1.0

    def unused_allow(self) -> list[str]:
        """The allow globs that matched no missing (resp. unexpected) key: likely typos."""
        unused = [g for g in self.allow_missing if not _any_match(self.missing, g)]
        unused += [g for g in self.allow_unexpected if not _any_match(self.unexpected, g)]
        return unused

    def to_json(self) -> dict[str, Any]:
        """The contract's JSON object (``diff --json``), plus the details as extra keys."""
        return {
            "compatible": self.compatible,
            "matched": list(self.matched),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "shape_mismatch": [
                {"key": m.key, "checkpoint": list(m.checkpoint), "model": list(m.model)}
                for m in self.shape_mismatch
            ],
            "dtype_mismatch": [
                {"key": m.key, "checkpoint": m.checkpoint, "model": m.model}
                for m in self.dtype_mismatch
            ],
            "allowed_missing": list(self.allowed_missing),
            "allowed_unexpected": list(self.allowed_unexpected),
            "tied_aliases": list(self.tied_aliases),
            "dropped_mismatched": [
                {"key": m.key, "checkpoint": list(m.checkpoint), "model": list(m.model)}
                for m in self.dropped_mismatched
            ],
            "summary": {
                "model_tensors": self.model_tensors,
                "checkpoint_tensors": self.checkpoint_tensors,
                "matched": len(self.matched),
                "missing": len(self.missing),
                "unexpected": len(self.unexpected),
                "shape_mismatch": len(self.shape_mismatch),
                "model_params": self.model_params,
                "matched_params": self.matched_params,
            },
        }

    def summary(self) -> str:
        """One line: ``matched 60 of 62 model tensors (99.2% of parameters); ... -> compatible``."""
        n_tied = len(self.tied_aliases)
        tied = f"+{n_tied} tied alias{'es' if n_tied != 1 else ''}; " if n_tied else ""
        counts = [
            f"missing {len(self.missing)}{_allowed(self.allowed_missing)}",
            f"unexpected {len(self.unexpected)}{_allowed(self.allowed_unexpected)}",
            f"shape mismatch {len(self.shape_mismatch)}",
        ]
        if self.dropped_mismatched:
            counts.append(f"dropped for shape {len(self.dropped_mismatched)}")
        verdict = "compatible" if self.compatible else "INCOMPATIBLE"
        return (
            f"matched {len(self.matched)} of {self.model_tensors} model tensors "
            f"({tied}{_percent(self.matched_params, self.model_params)} of parameters); "
            f"{', '.join(counts)} -> {verdict}"
        )

    def table(self, *, matched: bool = False, fmt: str = "simple", notes: bool = False) -> str:
        """The human report: one section per kind of key, then the summary line.

        Key lists are indented lines of grouped keys (``layer1.{0, 1}.bn1.{bias, weight}``),
        allowed ones marked; shape and dtype differences are small tables with both sides.
        ``matched=True`` lists the matched keys first (``diff`` does; the remap gate does not).
        ``fmt`` is the tabulate format of those tables. ``notes=True`` adds :meth:`notes` (the
        CLI prints them on stderr instead). The text depends on the report alone.
        """
        from ckptsurgery.render.tables import shape_str, table

        sections: list[str] = []

        def section(title: str, n: int, lines: Iterable[str]) -> None:
            if n:
                sections.append(f"{title} ({n}):\n" + "\n".join(_INDENT + line for line in lines))

        def key_lines(keys: Sequence[str], allowed: Sequence[str]) -> list[str]:
            allowed_set = set(allowed)
            lines = group_keys(k for k in keys if k not in allowed_set)
            return lines + [f"{g}  (allowed)" for g in group_keys(allowed)]

        def pair_table(pairs: Iterable[ShapeMismatch | DtypeMismatch], *, shapes: bool) -> str:
            show = shape_str if shapes else str
            rows = [
                (g, show(c), show(m)) for (c, m), keys in _by_pair(pairs) for g in group_keys(keys)
            ]
            return table(rows, ("key", "checkpoint", "model"), fmt=fmt)

        if matched:
            section("matched", len(self.matched), group_keys(self.matched))
        section(
            "missing: in the model, not in the checkpoint",
            len(self.missing),
            key_lines(self.missing, self.allowed_missing),
        )
        section(
            "unexpected: in the checkpoint, not in the model",
            len(self.unexpected),
            key_lines(self.unexpected, self.allowed_unexpected),
        )
        for title, mismatches in (
            ("shape mismatch", self.shape_mismatch),
            ("dropped for their shape (now missing)", self.dropped_mismatched),
        ):
            section(title, len(mismatches), pair_table(mismatches, shapes=True).splitlines())
        section(
            "tied aliases, filled by their partner",
            len(self.tied_aliases),
            (
                f"{k} (tied to {self.tied_to[k]})" if k in self.tied_to else k
                for k in self.tied_aliases
            ),
        )
        section(
            "dtype differences, cast to the model's dtype on load",
            len(self.dtype_mismatch),
            pair_table(self.dtype_mismatch, shapes=False).splitlines(),
        )
        if notes:
            section("notes", len(self.notes()), self.notes())
        sections.append(self.summary())
        return "\n\n".join(sections)

    def problems(self) -> str:
        """A short account of what makes it incompatible ("" when compatible), for messages."""
        parts = []
        if self.disallowed_missing:
            parts.append(_named(self.disallowed_missing, "missing key"))
        if self.disallowed_unexpected:
            parts.append(_named(self.disallowed_unexpected, "unexpected key"))
        if self.shape_mismatch:
            n = len(self.shape_mismatch)
            shown = "; ".join(
                f"{m.key}: checkpoint {list(m.checkpoint)}, model {list(m.model)}"
                for m in self.shape_mismatch[:_MAX_IN_MESSAGE]
            )
            more = "; ..." if n > _MAX_IN_MESSAGE else ""
            parts.append(f"{n} shape mismatch{'es' if n != 1 else ''} ({shown}{more})")
        return ", ".join(parts)

    def fixes(self) -> str:
        """What would make it load, phrased for library users ("" when compatible)."""
        hints = []
        missing, unexpected = self.disallowed_missing, self.disallowed_unexpected
        if missing and unexpected and not self.matched:
            hints.append("if the names differ by a prefix, rename the keys (Rules) first")
        if missing and all(k.endswith(".num_batches_tracked") for k in missing):
            hints.append(
                "only BatchNorm counters are missing (an old checkpoint): "
                "allow_missing=['*.num_batches_tracked'] keeps the model's"
            )
        elif missing:
            hints.append(
                f"allow_missing={_glob_hint(missing)} keeps the model's own values for those"
            )
        if unexpected:
            hints.append(f"allow_unexpected={_glob_hint(unexpected)} ignores those")
        if self.shape_mismatch:
            hints.append("drop_mismatched=True drops wrong-shaped keys (they become missing)")
        return ("To load anyway: " + "; ".join(hints) + ".") if hints else ""


def match(
    checkpoint: CheckpointLike,
    model: nn.Module | BuiltModel | CheckpointLike,
    *,
    allow_missing: Iterable[str] | str = (),
    allow_unexpected: Iterable[str] | str = (),
    drop_mismatched: bool = False,
    rules: Rules | None = None,
    key: str | None = None,
) -> MatchReport:
    """Match ``checkpoint``'s keys, shapes and dtypes against ``model``'s state dict.

    ``checkpoint`` is a path, an open :class:`Checkpoint` (both matched from the header; no
    tensor data is read; ``key`` picks a nested state dict in a file), a state dict or a
    mapping of :class:`TensorInfo`; ``rules`` rename its keys first. ``model`` is an
    ``nn.Module`` (meta is fine), a :class:`BuiltModel`, or another checkpoint (path, state
    dict, infos or Checkpoint) to match against. Nothing is loaded; see the module docstring.

    A rule or allow glob that matches nothing is an :class:`UnusedPatternWarning` and a line
    of :meth:`MatchReport.notes`. Ties are seen in a module (also on meta), in a state dict of
    real tensors (shared storage) and in a Checkpoint's ``aliases``; pass the module rather
    than a meta state dict.
    """
    allow_m = _globs("allow_missing", allow_missing)
    allow_u = _globs("allow_unexpected", allow_unexpected)
    with (
        checkpoint_input(checkpoint, key=key, rules=rules) as (ckpt_obj, unused),
        checkpoint_input(model) as (model_obj, _),
    ):
        report = _match(
            _side(ckpt_obj, what="checkpoint"),
            _side(model_obj, what="model"),
            allow_m,
            allow_u,
            drop_mismatched=drop_mismatched,
        )
    report = replace(report, unused_rules=tuple(unused))
    for line in report.notes():
        warnings.warn(line, UnusedPatternWarning, stacklevel=2)
    return report


def _match(
    ckpt: _Side,
    ref: _Side,
    allow_m: tuple[str, ...],
    allow_u: tuple[str, ...],
    *,
    drop_mismatched: bool,
) -> MatchReport:

    matched: list[str] = []
    missing: list[str] = []
    shape_mismatch: list[ShapeMismatch] = []
    dropped: list[ShapeMismatch] = []
    dtype_mismatch: list[DtypeMismatch] = []
    for key, want in ref.infos.items():
        have = ckpt.infos.get(key)
        if have is None:
            missing.append(key)
        elif have.shape != want.shape:
            mismatch = ShapeMismatch(key, have.shape, want.shape)
            if drop_mismatched:
                dropped.append(mismatch)
                missing.append(key)
            else:
                shape_mismatch.append(mismatch)
        else:
            matched.append(key)
            if have.dtype != want.dtype:
                dtype_mismatch.append(DtypeMismatch(key, have.dtype, want.dtype))
    unexpected = [k for k in ckpt.infos if k not in ref.infos]

    # A tied name is filled by loading any matched name of its tie group.
    partner: dict[str, str] = {}  # tie group -> first matched member
    for key in matched:
        partner.setdefault(ref.group[key], key)
    tied_to = {k: partner[ref.group[k]] for k in missing if ref.group[k] in partner}
    missing = [k for k in missing if k not in tied_to]

    seen_groups: set[str] = set()
    model_params = matched_params = 0
    for key, info in ref.infos.items():
        group = ref.group[key]
        if group in seen_groups:
            continue
        seen_groups.add(group)
        model_params += info.numel
        if group in partner:
            matched_params += info.numel

    return MatchReport(
        matched=matched,
        missing=missing,
        unexpected=unexpected,
        shape_mismatch=shape_mismatch,
        dtype_mismatch=dtype_mismatch,
        allowed_missing=[k for k in missing if any(fnmatchcase(k, g) for g in allow_m)],
        allowed_unexpected=[k for k in unexpected if any(fnmatchcase(k, g) for g in allow_u)],
        tied_aliases=list(tied_to),
        tied_to=tied_to,
        dropped_mismatched=dropped,
        model_tensors=len(ref.infos),
        checkpoint_tensors=len(ckpt.infos),
        model_params=model_params,
        matched_params=matched_params,
        allow_missing=allow_m,
        allow_unexpected=allow_u,
    )


# --- small helpers --------------------------------------------------------------------------


def _globs(name: str, value: Iterable[str] | str) -> tuple[str, ...]:
    # A single string is one glob, not its characters: allow_missing="fc.*" is a common slip.
    globs = (value,) if isinstance(value, str) else tuple(value)
    for g in globs:
        if not isinstance(g, str) or not g:
            raise CheckpointError(f"{name}: every glob must be a non-empty string, got {g!r}")
    return globs


def _any_match(keys: Sequence[str], glob: str) -> bool:
    return any(fnmatchcase(k, glob) for k in keys)


def _allowed(allowed: Sequence[str]) -> str:
    return f" ({len(allowed)} allowed)" if allowed else ""


def _percent(part: int, whole: int) -> str:
    if not whole:
        return "n/a"
    pct = 100 * part / whole
    # Never round an incomplete match up to 100.0%.
    return f"{math.floor(pct * 10) / 10:.1f}%" if part < whole else "100.0%"


def _named(keys: Sequence[str], noun: str = "key") -> str:
    """``3 missing keys (fc.{bias, weight}; head.weight)``: a count and the first key groups."""
    groups = group_keys(keys)
    shown = "; ".join(groups[:_MAX_IN_MESSAGE])
    more = "; ..." if len(groups) > _MAX_IN_MESSAGE else ""
    return f"{len(keys)} {noun}{'' if len(keys) == 1 else 's'} ({shown}{more})"


def _glob_hint(keys: Sequence[str]) -> str:
    """``['fc.*']`` for keys of a few modules, else a placeholder."""
    modules = list(dict.fromkeys(k.rpartition(".")[0] for k in keys))
    if len(modules) > 3 or "" in modules:
        return "[GLOB, ...]"
    return repr([f"{m}.*" for m in modules])


def _by_pair(
    mismatches: Iterable[ShapeMismatch | DtypeMismatch],
) -> list[tuple[tuple[Any, Any], list[str]]]:
    """Keys grouped by their (checkpoint, model) shapes or dtypes, in order of appearance."""
    grouped: dict[tuple[Any, Any], list[str]] = {}
    for key, in_checkpoint, in_model in mismatches:
        grouped.setdefault((in_checkpoint, in_model), []).append(key)
    return list(grouped.items())
