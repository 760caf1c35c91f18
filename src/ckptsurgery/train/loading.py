"""Loading pretrained weights into the model to fine-tune, through the project's rules and gate.

The checkpoint's state dict is renamed by :class:`~ckptsurgery.rules.Rules` (as ``remap``
does), then matched against the model whose head has already been replaced
(:func:`~ckptsurgery.match.match`). The gate is ``remap --model``'s, with the head allowed:

- the head's keys may be missing, and head keys whose shape differs from the new head (a
  1000-class ImageNet ``fc``) are dropped; anything else missing needs ``allow_missing``;
- any other shape mismatch, or an unexpected key not in ``allow_unexpected``, refuses the
  checkpoint with :class:`~ckptsurgery.errors.IncompatibleCheckpoint` carrying the report;
- a head that fits the new one (same class count) is loaded.

Then :func:`~ckptsurgery.loading.load_into` loads the matched keys and checks that they landed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ckptsurgery.errors import IncompatibleCheckpoint
from ckptsurgery.rules import KeyPlan, Rules
from ckptsurgery.train.heads import Head, is_head_key

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ckptsurgery.match import MatchReport

__all__ = ["LoadResult", "gate_weights", "load_weights"]


@dataclass(frozen=True)
class LoadResult:
    report: MatchReport
    plan: KeyPlan
    state_dict: dict[str, torch.Tensor]  # renamed, without the dropped head keys
    dropped_head: tuple[str, ...]  # head keys dropped for their shape
    loaded_head: bool  # the checkpoint's head fitted and is loaded
    source_key: str | None = None  # where the state dict was found in the file
    other_entries: dict[str, str] = field(default_factory=dict)  # the file's other entries


def gate_weights(
    state_dict: dict[str, torch.Tensor],
    model: nn.Module,
    head: Head,
    *,
    rules: Rules = Rules(),  # noqa: B008  # frozen, so a shared default is harmless
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
) -> LoadResult:
    """Rename ``state_dict`` and match it against ``model``; nothing is loaded.

    The result's ``report`` says whether it fits (``report.compatible``); see the module
    docstring for what the head is allowed.
    """
    from ckptsurgery.match import match

    plan = rules.plan(state_dict)
    renamed = plan.apply(state_dict)
    allow = (f"{head.name}.*", *allow_missing)
    report = match(
        renamed, model, allow_missing=allow, allow_unexpected=allow_unexpected, drop_mismatched=True
    )
    dropped = tuple(m.key for m in report.dropped_mismatched if is_head_key(m.key, head))
    if len(dropped) != len(report.dropped_mismatched):
        # Only the head may be dropped for its shape; match again without the head's
        # mismatches so that the others are reported as the shape mismatches they are.
        renamed_kept = {k: v for k, v in renamed.items() if k not in dropped}
        report = match(renamed_kept, model, allow_missing=allow, allow_unexpected=allow_unexpected)
    kept = {k: v for k, v in renamed.items() if k not in dropped}
    loaded_head = any(is_head_key(k, head) for k in report.matched)
    return LoadResult(report, plan, kept, dropped, loaded_head)


def load_weights(
    model: nn.Module,
    head: Head,
    path: str,
    *,
    key: str | None = None,
    rules: Rules = Rules(),  # noqa: B008
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
    allow_globals: tuple[str, ...] = (),
    unsafe_pickle: bool = False,
    dry_run: bool = False,
) -> LoadResult:
    """Read ``path``, gate it (:func:`gate_weights`) and load it into ``model``.

    Raises :class:`IncompatibleCheckpoint` (with ``.report``) and loads nothing when it does
    not fit. With ``dry_run`` the report is made and nothing is loaded.
    """
    from ckptsurgery.io import open_checkpoint
    from ckptsurgery.loading import load_into

    with open_checkpoint(
        path, key=key, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
    ) as ckpt:
        sd = ckpt.state_dict()
        found_at, other = ckpt.key, dict(ckpt.other_entries)
    result = gate_weights(
        sd,
        model,
        head,
        rules=rules,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
    )
    result = replace(result, source_key=found_at, other_entries=other)
    report = result.report
    if not report.compatible:
        raise IncompatibleCheckpoint(
            f"{path}: the weights do not fit the model ({report.problems()}); nothing was "
            "trained. Only the head may be missing: pass --allow-missing / --allow-unexpected "
            "for other keys, or rename them with rule flags / --rules",
            report=report,
        )
    if not dry_run:
        load_into(
            model,
            result.state_dict,
            allow_missing=(f"{head.name}.*", *allow_missing),
            allow_unexpected=allow_unexpected,
        )
    return result
