"""File-level operations shared by the library API and the CLI: load, save, remap."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Unpack

from ckptsurgery._types import PathLike
from ckptsurgery._version import __version__
from ckptsurgery.io import (
    TensorDictSource,
    WriteResult,
    check_output_path,
    open_checkpoint,
    output_format,
    write_checkpoint,
)
from ckptsurgery.plan.gate import Gate
from ckptsurgery.plan.model import SourceSpec
from ckptsurgery.plan.run import SurgeryOptions, SurgeryResult, run_surgery
from ckptsurgery.rules import Rules

if TYPE_CHECKING:
    from torch import Tensor

    from ckptsurgery.candidates import CandidateFit
    from ckptsurgery.match import MatchReport
    from ckptsurgery.suggest import Suggestion

__all__ = [
    "DiffResult",
    "Gate",
    "RemapResult",
    "diff",
    "load_state_dict",
    "remap",
    "save_state_dict",
]

# remap's result is every surgery's: the plan, the gate's report, what was written.
RemapResult = SurgeryResult


def load_state_dict(
    path: PathLike,
    key: str | None = None,
    *,
    allow_globals: tuple[str, ...] | list[str] = (),
    unsafe_pickle: bool = False,
) -> dict[str, Tensor]:
    """The state dict stored in ``path`` (torch or safetensors), loaded weights-only.

    Nested state dicts are found as the CLI finds them; ``key="a/b"`` picks one. Tied tensors
    come back as one tensor under several names.
    """
    with open_checkpoint(
        path, key=key, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
    ) as ckpt:
        sd = ckpt.state_dict()
    return sd


def save_state_dict(
    state_dict: Mapping[str, Tensor],
    path: PathLike,
    *,
    format: str | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
    verify: bool = True,
) -> WriteResult:
    """Write ``state_dict`` to ``path`` atomically (format from the extension or ``format``).

    Tensors are stored bit-exactly; tied tensors are stored once and come back tied. The file
    is read back and checked before it takes its name (``verify=False`` skips that).
    """
    fmt = output_format(path, format)
    out = check_output_path(path, force=overwrite)
    src = TensorDictSource(state_dict)
    names = [(k, k) for k in src.infos]
    meta = {"ckptsurgery.version": __version__, **(metadata or {})}
    return write_checkpoint(
        out, src, names, fmt=fmt, metadata=meta, overwrite=overwrite, verify=verify
    )


def remap(
    src: PathLike,
    out: PathLike | None,
    rules: Rules,
    *,
    key: str | None = None,
    **options: Unpack[SurgeryOptions],
) -> SurgeryResult:
    """Apply ``rules`` to the checkpoint at ``src`` and write the result to ``out``.

    The output is checked (format, existence, not an input) before anything is read, so a
    mistake costs nothing. With ``gate`` the renamed keys are matched against a model first
    and nothing is written unless they fit (:class:`IncompatibleCheckpoint`, carrying the
    report). With ``dry_run`` only the plan (and the gate's report) is made; ``out`` may then
    be None. The options (``dtype``, ``keep_dtype``, ``format``, ``force``, ``dry_run``,
    ``gate``, trust, ``verify``, ``max_shard_size``, ``progress``) are
    :class:`~ckptsurgery.plan.run.SurgeryOptions`.
    """
    return run_surgery([SourceSpec(src, key, rules)], out, mode="remap", **options)


@dataclass(frozen=True)
class DiffResult:
    report: MatchReport
    suggestion: Suggestion | None
    source_key: str | None
    other_entries: dict[str, str]
    # Several nested state dicts and ``suggest``: how each fits, the one used and why.
    candidates: tuple[CandidateFit, ...] = ()
    recommendation: str = ""
    # What the rules given did (each rule as a CLI flag, and how many keys it matched).
    rule_counts: tuple[tuple[str, int], ...] = ()


def diff(
    src: PathLike,
    target: Any,
    *,
    key: str | None = None,
    target_key: str | None = None,
    rules: Rules | None = None,
    allow_missing: tuple[str, ...] | list[str] = (),
    allow_unexpected: tuple[str, ...] | list[str] = (),
    suggest: bool = False,
    allow_globals: tuple[str, ...] | list[str] = (),
    unsafe_pickle: bool = False,
) -> DiffResult:
    """Dry-run match of the checkpoint at ``src`` against ``target``; no tensor data is read.

    ``target`` is a model (``nn.Module`` or ``BuiltModel``) or the path of a reference
    checkpoint (``target_key`` selects its state dict). ``rules`` are applied to the keys
    first (nothing is written). With ``suggest``, also infer the rules that would make the most
    keys match, starting from ``rules``; and when ``src`` holds several nested state dicts and
    no ``key`` is given, match each against the target and go on with the recommended one
    (``candidates``, ``recommendation``), or raise when none can be chosen.
    """
    from ckptsurgery.errors import StateDictSelectionError
    from ckptsurgery.loading import tie_groups

    trust = {"allow_globals": tuple(allow_globals), "unsafe_pickle": unsafe_pickle}
    if isinstance(target, str | os.PathLike):
        with open_checkpoint(target, key=target_key, **trust) as ref:  # type: ignore[arg-type]
            side: Any = ref  # matched from its header, which stays readable once closed
            target_shapes = {k: i.shape for k, i in ref.infos.items()}
            target_ties = tie_groups(ref)
    else:
        side = target
        module = getattr(target, "module", target)  # a BuiltModel or a module
        target_shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        target_ties = tie_groups(target)
    options: dict[str, Any] = {
        "rules": rules or Rules(),
        "allow_missing": allow_missing,
        "allow_unexpected": allow_unexpected,
        "target": (side, target_shapes, target_ties),
        "suggest": suggest,
    }
    try:
        return _diff_one(src, key, trust, **options)
    except StateDictSelectionError as e:
        if not suggest or key is not None or len(e.candidates) < 2:
            raise
        fits = [_fit(src, k, trust, options) for k in e.candidates]
        from ckptsurgery.candidates import recommend

        chosen, reason = recommend(fits)
        if chosen is None:
            raise StateDictSelectionError(
                f"{e}; matched against the target: "
                + ", ".join(f"{f.key} {f.matched_with_rules} of {f.model_keys}" for f in fits)
                + f" ({reason})",
                candidates=e.candidates,
            ) from None
        result = _diff_one(src, chosen, trust, **options)
        return replace(result, candidates=tuple(fits), recommendation=f"{chosen}: {reason}")


def _diff_one(
    src: PathLike,
    key: str | None,
    trust: dict[str, Any],
    *,
    rules: Rules,
    allow_missing: tuple[str, ...] | list[str],
    allow_unexpected: tuple[str, ...] | list[str],
    target: tuple[Any, dict[str, tuple[int, ...]], dict[str, str]],
    suggest: bool,
) -> DiffResult:
    from ckptsurgery.match import match
    from ckptsurgery.suggest import suggest_after

    side, target_shapes, target_ties = target
    with open_checkpoint(src, key=key, **trust) as ckpt:
        checkpoint: Any = ckpt
        counts: tuple[tuple[str, int], ...] = ()
        if rules:
            plan = rules.plan(ckpt.infos)
            checkpoint = {new: ckpt.infos[old] for old, new in plan.renames}
            counts = plan.rule_counts
        report = match(
            checkpoint, side, allow_missing=allow_missing, allow_unexpected=allow_unexpected
        )
        suggestion = None
        if suggest:
            shapes = {k: i.shape for k, i in ckpt.infos.items()}
            suggestion = suggest_after(rules, shapes, target_shapes, ties=target_ties)
        return DiffResult(report, suggestion, ckpt.key, ckpt.other_entries, rule_counts=counts)


def _fit(src: PathLike, key: str, trust: dict[str, Any], options: dict[str, Any]) -> CandidateFit:
    """How the state dict at ``key`` fits the target, as it is and with suggested rules."""
    from ckptsurgery.candidates import CandidateFit

    with open_checkpoint(src, key=key, **trust) as ckpt:
        tensors, size = len(ckpt.infos), ckpt.total_bytes
    result = _diff_one(src, key, trust, **{**options, "suggest": True})
    s = result.suggestion
    matched = len(result.report.matched)
    return CandidateFit(
        key=key,
        tensors=tensors,
        bytes=size,
        matched=matched,
        matched_with_rules=max(s.matched_after, s.matched_before) if s is not None else matched,
        model_keys=s.model_keys if s is not None else len(options["target"][1]),
        compatible=result.report.compatible,
    )
