"""Merging checkpoints: the union of their keys, their weighted elementwise mean, or
fine-tunes merged into their base by task arithmetic, TIES or DARE
(:mod:`ckptsurgery.plan.methods`).

Both are surgeries like any other (:mod:`ckptsurgery.plan`): a merge is planned on key names,
shapes and dtypes alone, gated, then executed one output tensor at a time. A union copies
each output tensor bit-exactly from the source it comes from; an average computes one
tensor's weighted mean from every source when the writer asks for it, so peak memory stays
near one tensor's accumulator plus one source tensor, whatever the checkpoints' size. The
decisions (order, conflicts, what is averaged and how) are :mod:`ckptsurgery.plan.build`'s.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, Unpack, cast

from ckptsurgery._types import PathLike
from ckptsurgery.errors import MergeConflictError, MergeError
from ckptsurgery.io import TensorDictSource
from ckptsurgery.plan.build import ON_CONFLICT, build_plan, check_on_conflict, plan_union
from ckptsurgery.plan.execute import materialize
from ckptsurgery.plan.lora import LoraAdapter
from ckptsurgery.plan.methods import METHODS, method_op
from ckptsurgery.plan.model import Conflict, Plan, SourceSpec
from ckptsurgery.plan.run import SurgeryOptions, SurgeryResult, run_surgery
from ckptsurgery.rules import Rules

if TYPE_CHECKING:
    import torch


__all__ = [
    "METHODS",
    "ON_CONFLICT",
    "Conflict",
    "MergeConflictError",
    "MergeError",
    "MergeResult",
    "SourceSpec",
    "average",
    "average_files",
    "fold_lora",
    "merge",
    "merge_files",
    "method_merge",
    "method_merge_files",
    "normalise_weights",
]

V = TypeVar("V")

# A merge's result is every surgery's: the plan, the gate's report, what was written.
MergeResult = SurgeryResult


def merge(state_dicts: Sequence[Mapping[str, V]], *, on_conflict: str = "error") -> dict[str, V]:
    """The union of ``state_dicts``' keys, as a new dict; the inputs are left as they were.

    A key in several state dicts raises :class:`MergeConflictError` under
    ``on_conflict="error"``, or is taken from the first / last that has it under ``"first"`` /
    ``"last"``. Values are not copied: the result holds the inputs' own tensors.
    """
    labels = [f"state dict {i + 1}" for i in range(len(state_dicts))]
    entries, _ = plan_union([[(k, k) for k in sd] for sd in state_dicts], on_conflict, labels)
    return {new: state_dicts[i][old] for new, i, old in entries}


def average(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """The (weighted) elementwise mean of ``state_dicts``, as a new dict of new tensors.

    Every state dict needs the same keys and shapes (else :class:`MergeError` naming the
    differences). ``weights`` (default: equal) must be positive, one per state dict, and are
    normalised to sum 1. Floating tensors are averaged in float32 or wider and keep the first
    state dict's dtype; integer and bool tensors are the first state dict's own (a warning
    says when the others disagree). The inputs are left as they were.
    """
    if len(state_dicts) < 1:
        raise MergeError("nothing to average: give at least one state dict")
    w = normalise_weights(weights, len(state_dicts))
    sources = [
        TensorDictSource(sd, source=f"state dict {i + 1}") for i, sd in enumerate(state_dicts)
    ]
    plan = build_plan(sources, [Rules()] * len(sources), mode="average", weights=w)
    return _in_memory(plan, sources)


def _in_memory(plan: Plan, sources: Sequence[TensorDictSource]) -> dict[str, torch.Tensor]:
    """The output of ``plan`` over state dicts in memory; its notes are warnings, raised at
    the caller of the public function that called this."""
    out, notes = materialize(plan, sources)
    for message in (*plan.notes, *notes):
        warnings.warn(message, UserWarning, stacklevel=3)
    return out


def normalise_weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    """``weights`` scaled to sum 1 (equal weights when None or empty), or :class:`MergeError`."""
    if not weights:
        return tuple(1.0 / n for _ in range(n))
    values = list(weights)
    if len(values) != n:
        raise MergeError(
            f"{len(values)} weight{'s' if len(values) != 1 else ''} for {n} sources; give one "
            "weight per source, in the same order (or none for equal weights)"
        )
    for w in values:
        if isinstance(w, bool) or not isinstance(w, int | float):
            raise MergeError(f"weight {w!r} is not a number")
        if not math.isfinite(w) or w <= 0:
            raise MergeError(f"weight {w!r} is not a positive number; every weight must be > 0")
    total = math.fsum(values)
    return tuple(w / total for w in values)


def merge_files(
    sources: Sequence[PathLike | SourceSpec],
    out: PathLike | None,
    *,
    on_conflict: str = "error",
    key: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    **options: Unpack[SurgeryOptions],
) -> MergeResult:
    """Write the union of the checkpoints at ``sources`` to ``out``, tensor by tensor.

    A source is a path (its state dict selected with ``key``) or a :class:`SourceSpec` with its
    own key and rules. ``on_conflict`` is "error" (raise :class:`MergeConflictError`), "first"
    or "last". The output is checked before anything is read; with ``gate`` the result is
    matched against a model first and nothing is written unless it fits
    (:class:`IncompatibleCheckpoint`). A safetensors output records its provenance in
    ``ckptsurgery.*`` metadata (plus the ``provenance`` entries given, JSON-encoded). The
    other options are :class:`~ckptsurgery.plan.run.SurgeryOptions`.
    """
    check_on_conflict(on_conflict)
    specs = _specs(sources, key)
    return run_surgery(
        specs, out, mode="union", on_conflict=on_conflict, provenance_extra=provenance, **options
    )


def average_files(
    sources: Sequence[PathLike | SourceSpec],
    out: PathLike | None,
    *,
    weights: Sequence[float] | None = None,
    key: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    **options: Unpack[SurgeryOptions],
) -> MergeResult:
    """Write the (weighted) elementwise mean of the checkpoints at ``sources`` to ``out``.

    As :func:`average` for files, computed one tensor at a time (see the module docstring);
    otherwise as :func:`merge_files`.
    """
    specs = _specs(sources, key)
    if len(specs) < 2:
        raise MergeError("averaging needs at least two sources")
    extra = {**({"weights_given": list(weights)} if weights else {}), **(provenance or {})}
    w = normalise_weights(weights, len(specs))
    return run_surgery(specs, out, mode="average", weights=w, provenance_extra=extra, **options)


def method_merge(
    base: Mapping[str, torch.Tensor],
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    *,
    method: str,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    lambda_: float = 1.0,
    seed: int | None = None,
    normalize: bool | None = None,
) -> dict[str, torch.Tensor]:
    """``state_dicts`` (fine-tunes of ``base``) merged into ``base`` by ``method``, as a new
    dict of new tensors: "task-arithmetic", "ties", "dare-linear" or "dare-ties".

    ``weights``: one per fine-tune (default 1 each; not normalised); ``density``: the
    fraction of each task vector kept, in (0, 1] (required by ties and DARE, refused by task
    arithmetic); ``lambda_`` scales the merged task vector; ``seed`` (DARE only, default 0)
    makes the random drop reproducible; ``normalize`` (default: true for ties only) divides
    by the weights that took part. The definitions are in :mod:`ckptsurgery.plan.methods`.
    Every state dict needs the base's keys and shapes (else :class:`MergeError`); integer
    and bool tensors are the base's own (a warning says when the others disagree).
    """
    op = method_op(
        method,
        models=len(state_dicts),
        weights=weights,
        density=density,
        lambda_=lambda_,
        seed=seed,
        normalize=normalize,
    )
    sources = [TensorDictSource(base, source="base")] + [
        TensorDictSource(sd, source=f"state dict {i + 1}") for i, sd in enumerate(state_dicts)
    ]
    plan = build_plan(sources, [Rules()] * len(sources), mode="method", method=op)
    return _in_memory(plan, sources)


def method_merge_files(
    base: PathLike | SourceSpec,
    sources: Sequence[PathLike | SourceSpec],
    out: PathLike | None,
    *,
    method: str,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    lambda_: float = 1.0,
    seed: int | None = None,
    normalize: bool | None = None,
    key: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    **options: Unpack[SurgeryOptions],
) -> MergeResult:
    """Write the fine-tunes at ``sources`` merged into ``base`` by ``method`` to ``out``, one
    tensor at a time: as :func:`method_merge` for files; otherwise as :func:`merge_files`.
    The output's provenance records the method and every parameter."""
    specs = _specs([base, *_specs(sources, key)], key)
    op = method_op(
        method,
        models=len(specs) - 1,
        weights=weights,
        density=density,
        lambda_=lambda_,
        seed=seed,
        normalize=normalize,
    )
    return run_surgery(specs, out, mode="method", method=op, provenance_extra=provenance, **options)


def fold_lora(
    base: PathLike | SourceSpec | Sequence[PathLike | SourceSpec],
    adapter: PathLike | LoraAdapter,
    out: PathLike | None,
    *,
    key: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    **options: Unpack[SurgeryOptions],
) -> MergeResult:
    """Write ``base`` with the ``peft`` LoRA ``adapter`` folded in to ``out``, tensor by tensor.

    ``adapter`` is the folder peft's ``save_pretrained`` wrote (``adapter_config.json`` and
    ``adapter_model.safetensors`` or ``.bin``). Each target weight becomes ``W + scale * B @ A``
    (see :mod:`ckptsurgery.plan.lora`), computed in float32 and stored in the base's dtype (or
    ``dtype``); the adapter's full copies (``modules_to_save``) replace the base's tensors.
    ``base`` is one checkpoint (or several, merged as :func:`merge_files` does first).
    Adapters it cannot fold raise :class:`~ckptsurgery.plan.lora.LoraError`. The other options
    are :func:`merge_files`'s.
    """
    sources: list[PathLike | SourceSpec] = (
        list(base) if isinstance(base, list | tuple) else [cast("PathLike | SourceSpec", base)]
    )
    options["lora"] = adapter if isinstance(adapter, LoraAdapter) else LoraAdapter(adapter)
    return merge_files(sources, out, key=key, provenance=provenance, **options)


def _specs(sources: Sequence[PathLike | SourceSpec], key: str | None) -> list[SourceSpec]:
    if isinstance(sources, str | Path):
        raise TypeError("sources must be a list of paths, not one path")
    specs = [s if isinstance(s, SourceSpec) else SourceSpec(s, key=key) for s in sources]
    if not specs:
        raise MergeError("nothing to merge: give at least one source")
    return specs
