"""The one exception family of ckptsurgery.

Every failure a user can cause (a bad path, a malformed file, an unsafe pickle, a rule that
makes two keys collide) raises a subclass of :class:`CheckpointError`. The CLI turns any of
them into a single ``Error: ...`` line and exit code 2; library users catch the base class.

::

    CheckpointError
    ├── SourceError                 a source cannot be read
    │   ├── FormatError             not a checkpoint, truncated or malformed
    │   └── UnsafePickleError       the pickle needs globals outside the weights-only set
    ├── StateDictSelectionError     no, several, or the wrong nested state dict (--key)
    ├── RuleError                   a malformed rule or rules file
    │   ├── KeyCollisionError       two keys renamed to the same name
    │   └── RecipeError             a malformed recipe, every problem listed (ckptsurgery.recipe)
    ├── MergeError                  sources that cannot be merged or averaged
    │   ├── MergeConflictError      a key in several sources under on_conflict="error"
    │   └── LoraError               a LoRA adapter that cannot be folded (ckptsurgery.plan.lora)
    ├── OutputError                 the output cannot be written (exists, is an input, ...)
    ├── ModelSpecError              a model SPEC that does not resolve (ckptsurgery.models)
    └── IncompatibleCheckpoint      the checkpoint does not fit the model (carries the report)
"""

from __future__ import annotations

from typing import Any


class CheckpointError(Exception):
    """Base class of every error ckptsurgery raises for bad input or a refused operation."""


class SourceError(CheckpointError):
    """A source checkpoint cannot be read."""


class FormatError(SourceError):
    """The file is not a checkpoint ckptsurgery can read, or it is truncated or malformed."""


class UnsafePickleError(SourceError):
    """The pickle references globals outside torch's weights-only allowlist."""

    def __init__(self, message: str, *, globals_: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.globals = globals_


class StateDictSelectionError(CheckpointError):
    """No state dict, several candidates, or a ``--key`` path that does not lead to one."""

    def __init__(self, message: str, *, candidates: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.candidates = candidates


class RuleError(CheckpointError):
    """A rule or a rules file is malformed."""


class KeyCollisionError(RuleError):
    """Two or more keys would be renamed to the same name."""

    def __init__(self, message: str, *, collisions: dict[str, tuple[str, ...]]) -> None:
        super().__init__(message)
        self.collisions = collisions


class MergeError(CheckpointError):
    """Sources that cannot be merged or averaged as asked (key sets, shapes, weights)."""


class MergeConflictError(MergeError):
    """A key is in several sources and ``on_conflict="error"``; ``conflicts``: key -> sources."""

    def __init__(self, message: str, *, conflicts: dict[str, tuple[str, ...]]) -> None:
        super().__init__(message)
        self.conflicts = conflicts


class OutputError(CheckpointError):
    """The output cannot be written: it exists (without force), is an input, or is unwritable."""


class IncompatibleCheckpoint(CheckpointError):
    """The checkpoint does not fit the model; ``report`` says how, and ``suggestion`` (when
    not None) holds the rules that would make more keys match."""

    def __init__(self, message: str, *, report: Any = None, suggestion: Any = None) -> None:
        super().__init__(message)
        self.report = report
        self.suggestion = suggestion
