"""Loading pretrained weights into the model to fine-tune, through the project's one surgery
pipeline (:mod:`ckptsurgery.plan`).

The checkpoint's header is planned as ``remap`` plans it (:class:`~ckptsurgery.rules.Rules`
rename its keys), then the plan is matched against the model whose head has already been
replaced. The gate is ``remap --model``'s, with the head allowed:

- the head's keys may be missing, and head keys whose shape differs from the new head (a
  1000-class ImageNet ``fc``) are dropped from the plan; anything else missing needs
  ``allow_missing``;
- any other shape mismatch, or an unexpected key not in ``allow_unexpected``, refuses the
  checkpoint with :class:`~ckptsurgery.errors.IncompatibleCheckpoint` carrying the report;
- a head that fits the new one (same class count) is loaded.

Only then is the plan executed, into memory (:func:`~ckptsurgery.plan.execute.materialize`),
and :func:`~ckptsurgery.loading.load_into` loads the result and checks that it landed. A dry
run reads no tensor data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckptsurgery.errors import IncompatibleCheckpoint
from ckptsurgery.rules import KeyPlan, Rules
from ckptsurgery.train.heads import Head, is_head_key

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ckptsurgery.io import Checkpoint
    from ckptsurgery.match import MatchReport
    from ckptsurgery.plan.model import Plan

__all__ = ["LoadResult", "gate_plan", "load_weights"]


@dataclass(frozen=True)
class LoadResult:
    report: MatchReport
    plan: Plan  # what is loaded: renamed, without the dropped head keys
    state_dict: dict[str, torch.Tensor]  # the plan executed (empty for a dry run)
    dropped_head: tuple[str, ...]  # head keys dropped for their shape
    loaded_head: bool  # the checkpoint's head fitted and is loaded
    source_key: str | None = None  # where the state dict was found in the file
    other_entries: dict[str, str] = field(default_factory=dict)  # the file's other entries

    @property
    def keys(self) -> KeyPlan:
        """The rules' effect on the checkpoint's keys."""
        return self.plan.sources[0].keys


def gate_plan(
    plan: Plan,
    ckpt: Checkpoint,
    model: nn.Module,
    head: Head,
    *,
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
) -> tuple[Plan, MatchReport, tuple[str, ...]]:
    """Match ``plan`` (over ``ckpt``) against ``model``; nothing is read or loaded.

    Returns the plan without the head keys dropped for their shape, the report (whether it
    fits: ``report.compatible``) and those dropped keys; see the module docstring for what
    the head is allowed.
    """
    from ckptsurgery.match import match
    from ckptsurgery.plan.execute import PlanSource

    allow = (f"{head.name}.*", *allow_missing)
    report = match(
        PlanSource(plan, [ckpt]),
        model,
        allow_missing=allow,
        allow_unexpected=allow_unexpected,
        drop_mismatched=True,
    )
    dropped = tuple(m.key for m in report.dropped_mismatched if is_head_key(m.key, head))
    plan = plan.without(dropped, reason="the old head's shape")
    if len(dropped) != len(report.dropped_mismatched):
        # Only the head may be dropped for its shape; match again without the head's
        # mismatches so that the others are reported as the shape mismatches they are.
        report = match(
            PlanSource(plan, [ckpt]),
            model,
            allow_missing=allow,
            allow_unexpected=allow_unexpected,
        )
    return plan, report, dropped


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
    """Plan ``path``'s surgery, gate it (:func:`gate_plan`) and load it into ``model``.

    Raises :class:`IncompatibleCheckpoint` (with ``.report``) and loads nothing when it does
    not fit. With ``dry_run`` the report is made and nothing is read or loaded.
    """
    from ckptsurgery.io import open_checkpoint
    from ckptsurgery.loading import load_into
    from ckptsurgery.plan.build import build_plan
    from ckptsurgery.plan.execute import materialize

    with open_checkpoint(
        path, key=key, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
    ) as ckpt:
        plan = build_plan([ckpt], [rules], mode="remap", labels=[str(path)])
        plan, report, dropped = gate_plan(
            plan,
            ckpt,
            model,
            head,
            allow_missing=allow_missing,
            allow_unexpected=allow_unexpected,
        )
        if not report.compatible:
            raise IncompatibleCheckpoint(
                f"{path}: the weights do not fit the model ({report.problems()}); nothing was "
                "trained. Only the head may be missing: pass --allow-missing / "
                "--allow-unexpected for other keys, or rename them with rule flags / --rules",
                report=report,
            )
        state_dict = {} if dry_run else materialize(plan, [ckpt])[0]
        result = LoadResult(
            report,
            plan,
            state_dict,
            dropped,
            loaded_head=any(is_head_key(k, head) for k in report.matched),
            source_key=ckpt.key,
            other_entries=dict(ckpt.other_entries),
        )
    if not dry_run:
        load_into(
            model,
            result.state_dict,
            allow_missing=(f"{head.name}.*", *allow_missing),
            allow_unexpected=allow_unexpected,
        )
    return result
