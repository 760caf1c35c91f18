"""Loading that never loads silently: :func:`load_into`, and :func:`tie_groups`.

:func:`load_into` runs :func:`~ckptsurgery.match.match` first and loads nothing unless the
checkpoint fits; then it loads the matched keys and checks bit by bit that they landed.
:func:`tie_groups` gives a model's tie groups as :func:`~ckptsurgery.match.match` sees them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ckptsurgery.errors import CheckpointError, FormatError, IncompatibleCheckpoint
from ckptsurgery.inputs import _side, _tie_groups, checkpoint_input
from ckptsurgery.io import Checkpoint
from ckptsurgery.match import MatchReport, _named, match
from ckptsurgery.models import BuiltModel
from ckptsurgery.rules import Rules, UnusedPatternWarning

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ckptsurgery.match import CheckpointLike
    from ckptsurgery.suggest import Suggestion

__all__ = ["load_into", "tie_groups"]


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | Checkpoint | str | os.PathLike[str],
    *,
    allow_missing: Iterable[str] | str = (),
    allow_unexpected: Iterable[str] | str = (),
    drop_mismatched: bool = False,
    rules: Rules | None = None,
    key: str | None = None,
) -> MatchReport:
    """Load ``state_dict`` into ``model`` after a :func:`match`, or raise and load nothing.

    ``state_dict`` is a state dict, an open :class:`Checkpoint` or a path (``key`` picks a
    nested state dict in a file); from a file, only the matched tensors are read, after the
    match. ``rules`` rename the checkpoint's keys first.

    Raises :class:`IncompatibleCheckpoint` (with ``.report``, and ``.suggestion`` when renaming
    would help: its message names the rules, e.g. ``Rules(add_prefix='bert.')``) and leaves the
    model untouched when the match is not compatible, or when the model ties names to which the
    checkpoint gives different values. Otherwise loads the matched keys only (``strict=False``),
    then checks bit by bit that every one of them landed (after the cast to the model's dtype).
    The caller's mapping is never modified. Returns the report.
    """
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"load_into needs an nn.Module, got {type(model).__name__}")
    with checkpoint_input(state_dict, key=key) as (source, _):
        return _load_into(
            model,
            source,
            allow_missing=allow_missing,
            allow_unexpected=allow_unexpected,
            drop_mismatched=drop_mismatched,
            rules=rules,
        )


def _load_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | Checkpoint,
    *,
    allow_missing: Iterable[str] | str,
    allow_unexpected: Iterable[str] | str,
    drop_mismatched: bool,
    rules: Rules | None,
) -> MatchReport:
    import torch

    renamed: Mapping[str, torch.Tensor] | Checkpoint = state_dict
    if rules is not None:
        # Renamed without warnings here: match() below warns about the unused rules.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnusedPatternWarning)
            renamed = rules.apply(state_dict)
    report = match(
        state_dict,
        model,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        drop_mismatched=drop_mismatched,
        rules=rules,
    )
    state_dict = renamed
    if not report.compatible:
        suggestion = _suggestion(state_dict, model, report)
        fix = ""
        if suggestion is not None and suggestion.rules is not None:
            fix = (
                f"Try rules={suggestion.rules!r}: {suggestion.matched_after} of "
                f"{suggestion.model_keys} model keys would match"
            )
            if suggestion.allow_missing:
                fix += f", with allow_missing={list(suggestion.allow_missing)!r}"
            fix += ". "
        raise IncompatibleCheckpoint(
            f"the checkpoint does not fit the model: {report.problems()}. Nothing was loaded. "
            f"{fix}{report.fixes()}".rstrip(),
            report=report,
            suggestion=suggestion,
        )

    targets = model.state_dict(keep_vars=True)
    on_meta = [k for k in report.matched if targets[k].is_meta]
    if on_meta:
        raise CheckpointError(
            f"the model's {_named(on_meta, 'tensor')} are on the meta device and cannot hold data; "
            "build the model with device='cpu' (build_model(spec, device='cpu'))"
        )

    values: dict[str, torch.Tensor] = {}
    for key in report.matched:
        value = state_dict.tensor(key) if isinstance(state_dict, Checkpoint) else state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise FormatError(f"load_into needs tensors; {key!r} is a {type(value).__name__}")
        values[key] = value

    to_load: dict[str, torch.Tensor] = {}
    loaded_from: dict[str, str] = {}  # tie group -> key whose value is loaded for it
    group = _tie_groups(targets)
    for key, value in values.items():
        first = loaded_from.get(group[key])
        if first is None:
            loaded_from[group[key]] = key
            to_load[key] = value
        elif not _same_bits(value, to_load[first]):
            raise IncompatibleCheckpoint(
                f"the model ties {first!r} and {key!r} (one tensor), but the checkpoint holds "
                "different values for them; drop one of them from the checkpoint first; "
                "nothing was loaded",
                report=report,
            )
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        # Modules read their state-dict version from here (e.g. BatchNorm's counters).
        to_load = _with_metadata(to_load, metadata)

    try:
        result = model.load_state_dict(to_load, strict=False)
    except RuntimeError as e:
        raise IncompatibleCheckpoint(
            f"loading failed and the model may be partly loaded: {e}", report=report
        ) from e
    if result.unexpected_keys:
        raise IncompatibleCheckpoint(
            f"the model did not take {_named(list(result.unexpected_keys))}, which its "
            "state_dict() lists; the model may be partly loaded",
            report=report,
        )

    after = model.state_dict()
    not_landed = [
        k
        for k in report.matched
        if not _same_bits(after[k], values[k].to(device=after[k].device, dtype=after[k].dtype))
    ]
    if not_landed:
        raise IncompatibleCheckpoint(
            f"after loading, {_named(not_landed)} do not hold the checkpoint's values "
            "(a load hook or a tied tensor overwrote them?); the model is partly loaded",
            report=report,
        )
    return report


def tie_groups(model: nn.Module | BuiltModel | CheckpointLike) -> dict[str, str]:
    """Every state-dict key of ``model`` -> the first key of its tie group (itself when untied).

    Ties are seen as :func:`match` sees them; ``suggest(..., ties=tie_groups(model))`` then
    counts a tied alias as filled by its partner, as :func:`match` does.
    """
    return dict(_side(model, what="model").group)


# --- small helpers --------------------------------------------------------------------------


def _suggestion(
    checkpoint: Mapping[str, torch.Tensor] | Checkpoint, model: nn.Module, report: MatchReport
) -> Suggestion | None:
    """The rules :func:`~ckptsurgery.suggest.suggest` finds, when they would match more keys."""
    if not (report.missing and report.unexpected):
        return None  # nothing to rename into: a head of another size, a missing buffer
    from ckptsurgery.suggest import suggest

    infos = checkpoint.infos if isinstance(checkpoint, Checkpoint) else checkpoint
    ckpt_shapes = {k: tuple(v.shape) for k, v in infos.items()}
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    found = suggest(ckpt_shapes, model_shapes, ties=tie_groups(model))
    if found.rules is None or found.matched_after <= found.matched_before:
        return None
    return found


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN equals itself, -0.0 differs from 0.0), as a uint8 view."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() == 0:
        return True
    a_bytes = a.detach().contiguous().reshape(-1).view(torch.uint8)
    b_bytes = b.detach().to(a.device).contiguous().reshape(-1).view(torch.uint8)
    return bool(torch.equal(a_bytes, b_bytes))


def _with_metadata(state: dict[str, torch.Tensor], metadata: object) -> dict[str, torch.Tensor]:
    from collections import OrderedDict

    out: OrderedDict[str, torch.Tensor] = OrderedDict(state)
    out._metadata = metadata  # type: ignore[attr-defined]
    return out
