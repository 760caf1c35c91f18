"""The gate, and the one shape every refusal takes.

A :class:`Gate` matches a plan's output (names, shapes, dtypes: no data) against a model
before anything is written. Whatever refuses a surgery — the gate (missing, unexpected or
shape-mismatched keys), a merge conflict, two keys renamed to one, an unsafe pickle, any
other bad input — is described by one :class:`Refusal`, made by :func:`refusal` from the
exception, with one JSON shape (:meth:`Refusal.to_json`)::

    {"refused": true, "reason": "incompatible", "exit_code": 1,
     "message": "refusing to write 'out.safetensors': ...",
     "problems": [{"kind": "missing", "key": "fc.weight"},
                  {"kind": "shape_mismatch", "key": "fc.bias", "checkpoint": [1000], "model": [10]}],
     "report": {...the match report, or null...}, "written": false}

``reason`` is one of ``incompatible`` (exit 1), ``conflict``, ``collision``, ``unsafe``,
``invalid`` (exit 2). A problem's ``kind`` is ``missing``, ``unexpected``,
``shape_mismatch``, ``conflict``, ``collision``, ``unsafe_global`` or ``error``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptsurgery._types import PathLike
from ckptsurgery.errors import (
    CheckpointError,
    IncompatibleCheckpoint,
    KeyCollisionError,
    MergeConflictError,
    UnsafePickleError,
)

if TYPE_CHECKING:
    from ckptsurgery.match import CheckpointLike, MatchReport

__all__ = ["Gate", "Refusal", "refusal"]


@dataclass(frozen=True)
class Gate:
    """Match the result against a model before writing; refuse unless compatible.

    ``model`` is an ``nn.Module`` (or a :class:`~ckptsurgery.models.BuiltModel`), or a mapping
    of names to tensors or :class:`TensorInfo` (a reference checkpoint).
    """

    model: Any
    allow_missing: tuple[str, ...] = ()
    allow_unexpected: tuple[str, ...] = ()
    drop_mismatched: bool = False  # drop keys whose shape disagrees (they become missing)

    def check(self, result: CheckpointLike) -> MatchReport:
        """The report of what is about to be written (``result``) against the model."""
        from ckptsurgery.match import match

        return match(
            result,
            self.model,
            allow_missing=self.allow_missing,
            allow_unexpected=self.allow_unexpected,
            drop_mismatched=self.drop_mismatched,
        )

    @staticmethod
    def refuse(report: MatchReport | None, out: PathLike | None) -> None:
        """Raise :class:`IncompatibleCheckpoint` unless ``report`` (if any) is compatible."""
        if report is not None and not report.compatible:
            raise IncompatibleCheckpoint(
                f"refusing to write {str(out)!r}: the result does not fit the model "
                f"({report.problems()})",
                report=report,
            )

    def to_dict(self) -> dict[str, Any]:
        """The gate as recorded in provenance and recipes."""
        return {
            "model": getattr(self.model, "spec", type(self.model).__name__),
            "allow_missing": list(self.allow_missing),
            "allow_unexpected": list(self.allow_unexpected),
            "drop_mismatched": self.drop_mismatched,
        }


@dataclass(frozen=True)
class Refusal:
    """Why a command refused: the same value for the JSON, the text and the exit code."""

    reason: str  # incompatible | conflict | collision | unsafe | invalid
    message: str
    problems: tuple[dict[str, Any], ...] = ()
    report: MatchReport | None = None
    context: dict[str, Any] = field(default_factory=dict)  # command, source(s), output

    @property
    def exit_code(self) -> int:
        """1 for a gate that refused a readable input; 2 for bad input or usage."""
        return 1 if self.reason == "incompatible" else 2

    def to_json(self) -> dict[str, Any]:
        return {
            **self.context,
            "refused": True,
            "reason": self.reason,
            "exit_code": self.exit_code,
            "message": self.message,
            "problems": [dict(p) for p in self.problems],
            "report": None if self.report is None else self.report.to_json(),
            "written": False,
        }

    def text(self, *, fmt: str = "simple") -> str:
        """The human rendering for stdout: the match report when there is one (the one-line
        ``Error:`` on stderr says the rest)."""
        if self.report is None:
            return ""
        return self.report.table(fmt=fmt)

    def error_line(self) -> str:
        """The one line for stderr, without the ``Error:`` prefix."""
        line = " ".join(self.message.split())
        return f"{line}; nothing written" if self.reason == "incompatible" else line


def refusal(error: CheckpointError, **context: Any) -> Refusal:
    """The :class:`Refusal` describing ``error``; ``context`` (command, sources, output) is
    carried into its JSON."""
    message = str(error)
    if isinstance(error, IncompatibleCheckpoint):
        report = error.report
        problems: list[dict[str, Any]] = []
        if report is not None:
            problems += [{"kind": "missing", "key": k} for k in report.disallowed_missing]
            problems += [{"kind": "unexpected", "key": k} for k in report.disallowed_unexpected]
            problems += [
                {
                    "kind": "shape_mismatch",
                    "key": m.key,
                    "checkpoint": list(m.checkpoint),
                    "model": list(m.model),
                }
                for m in report.shape_mismatch
            ]
        return Refusal("incompatible", message, tuple(problems), report, context)
    if isinstance(error, MergeConflictError):
        problems = [
            {"kind": "conflict", "key": k, "sources": list(v)} for k, v in error.conflicts.items()
        ]
        return Refusal("conflict", message, tuple(problems), None, context)
    if isinstance(error, KeyCollisionError):
        problems = [
            {"kind": "collision", "key": k, "sources": list(v)} for k, v in error.collisions.items()
        ]
        return Refusal("collision", message, tuple(problems), None, context)
    if isinstance(error, UnsafePickleError):
        problems = [{"kind": "unsafe_global", "key": g} for g in error.globals]
        return Refusal("unsafe", message, tuple(problems), None, context)
    return Refusal(
        "invalid",
        message,
        ({"kind": "error", "key": None, "type": type(error).__name__},),
        None,
        context,
    )
