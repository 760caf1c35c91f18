"""The one surgery pipeline, used by remap, merge, average and apply alike::

    check the output -> open the sources (headers) -> build the Plan -> gate -> execute

The output is checked before anything is read, so a mistake costs nothing; the plan and the
gate need no tensor data, so a dry run stops before any is read; the executor writes one
output tensor at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from ckptsurgery._types import PathLike
from ckptsurgery.errors import MergeError, OutputError, RuleError
from ckptsurgery.io import (
    WriteResult,
    check_output_folder,
    check_output_path,
    open_checkpoint,
    output_format,
    parse_size,
)
from ckptsurgery.io.progress import ProgressCallback
from ckptsurgery.plan.adapt import Adapter
from ckptsurgery.plan.build import build_plan
from ckptsurgery.plan.execute import PlanSource, execute
from ckptsurgery.plan.gate import Gate
from ckptsurgery.plan.lora import LoraAdapter, open_lora
from ckptsurgery.plan.model import Conflict, Op, Plan, SourcePart, SourceSpec
from ckptsurgery.plan.provenance import origin_groups, provenance

if TYPE_CHECKING:
    from ckptsurgery.match import MatchReport

__all__ = ["SurgeryResult", "run_surgery"]

Progress = ProgressCallback  # progress(bytes done, bytes total)


class SurgeryOptions(TypedDict, total=False):
    """The keyword options every surgery takes (remap, merge_files, average_files, apply):

    - ``dtype`` ("float32", "float16", "bfloat16"): cast floating tensors, except those whose
      output key matches a ``keep_dtype`` glob; integer and bool tensors are never cast;
    - ``format``: "safetensors" or "torch" (default: from the output's extension);
    - ``force``: replace an existing output; ``dry_run``: plan (and gate) only, write nothing;
    - ``gate``: a :class:`~ckptsurgery.plan.gate.Gate` the result must pass before writing;
    - ``allow_globals`` / ``unsafe_pickle``: trust for the sources' pickles;
    - ``verify`` (default True): read the output back and check it before it takes its name;
    - ``max_shard_size`` (``"5GB"``, ``"2GiB"`` or bytes): write a folder of safetensors shards;
    - ``progress(done, total)``: called with the bytes written so far;
    - ``adapters``: shape adapters (:class:`~ckptsurgery.plan.adapt.Rows`,
      :class:`~ckptsurgery.plan.adapt.InChans`,
      :class:`~ckptsurgery.plan.adapt.ResamplePosEmbed`) for the output tensors they match;
    - ``lora``: a :class:`~ckptsurgery.plan.lora.LoraAdapter` folded into the output tensors
      it names (``W + scale * B @ A``); its full copies replace the base's.
    """

    dtype: str | None
    keep_dtype: Sequence[str]
    format: str | None
    force: bool
    dry_run: bool
    gate: Gate | None
    allow_globals: Sequence[str]
    unsafe_pickle: bool
    verify: bool
    max_shard_size: int | str | None
    progress: Progress | None
    adapters: Sequence[Adapter]
    lora: LoraAdapter | None


@dataclass(frozen=True)
class SurgeryResult:
    """A surgery: its plan, the gate's report, and what was written (None for a dry run)."""

    plan: Plan
    report: MatchReport | None = None
    output: str | None = None
    written: WriteResult | None = None
    notes: tuple[str, ...] = ()

    @property
    def compatible(self) -> bool:
        return self.report is None or self.report.compatible

    @property
    def mode(self) -> str:
        return self.plan.mode

    @property
    def sources(self) -> tuple[SourcePart, ...]:
        return self.plan.sources

    @property
    def names(self) -> tuple[str, ...]:
        return self.plan.names

    @property
    def conflicts(self) -> tuple[Conflict, ...]:
        return self.plan.conflicts

    @property
    def weights(self) -> tuple[float, ...] | None:
        return self.plan.weights

    @property
    def copied(self) -> tuple[str, ...]:
        """An average's (or a method merge's) integer and bool tensors, copied from the first
        source (the base)."""
        if self.plan.mode not in ("average", "method"):
            return ()
        return tuple(e.name for e in self.plan.entries if e.op.is_copy)

    def to_dict(self) -> dict[str, Any]:
        """The JSON of every surgery command: sources and their renames, the plan, the gate's
        report, what was written."""
        plan = self.plan
        out: dict[str, Any] = {
            "mode": plan.mode,
            "output": self.output,
            "written": self.written is not None,
            "sources": [
                {
                    "path": s.path,
                    "key": s.key,
                    "tensors": s.tensors,
                    "kept": len(s.keys.renames),
                    "taken": s.taken,
                    "rules": s.rules.to_dict(),
                    **s.keys.to_dict(),
                }
                for s in plan.sources
            ],
            "tensors": len(plan.entries),
            "plan": plan.to_json(),
            "origin": origin_groups(plan),
            "notes": list(self.notes),
        }
        if plan.mode == "union":
            labels = [s.path for s in plan.sources]
            out["on_conflict"] = plan.on_conflict
            out["conflicts"] = [
                {
                    "key": c.key,
                    "sources": [labels[i] for i in c.sources],
                    "taken_from": labels[c.taken_from],
                }
                for c in plan.conflicts
            ]
        elif plan.mode == "average":
            out["weights"] = list(plan.weights or ())
            out["copied_from_first"] = list(self.copied)
        elif plan.mode == "method" and plan.method is not None:
            out["method"] = plan.method.to_json()
            out["copied_from_base"] = list(self.copied)
        if self.report is not None:
            out["report"] = self.report.to_json()
        if self.written is not None:
            out.update(
                format=self.written.format,
                bytes=self.written.bytes,
                stored=self.written.stored,
                timings={k: round(v, 3) for k, v in self.written.timings.items()},
            )
        return out


def run_surgery(
    specs: Sequence[SourceSpec],
    out: PathLike | None,
    *,
    mode: str,
    on_conflict: str = "error",
    weights: Sequence[float] | None = None,
    provenance_extra: Mapping[str, Any] | None = None,
    method: Op | None = None,
    **options: Unpack[SurgeryOptions],
) -> SurgeryResult:
    """Plan the surgery of ``specs`` (``mode``: remap, union, average or method, with
    ``method`` the op of :func:`~ckptsurgery.plan.methods.method_op`), gate it, and unless
    ``dry_run`` write it to ``out``; see :class:`SurgeryOptions` for the options,
    :func:`~ckptsurgery.plan.build.build_plan` for the plan and
    :func:`~ckptsurgery.plan.execute.execute` for the writing."""
    dtype, keep_dtype = options.get("dtype"), options.get("keep_dtype", ())
    force, dry_run = options.get("force", False), options.get("dry_run", False)
    gate, max_shard_size = options.get("gate"), options.get("max_shard_size")
    fmt = None
    shard_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    lora = options.get("lora")
    if out is not None:
        fmt = output_format(out, options.get("format"), sharded=shard_bytes is not None)
        inputs = [s.path for s in specs] + (list(lora.files()) if lora is not None else [])
        check = check_output_folder if shard_bytes is not None else check_output_path
        check(out, inputs=inputs, force=force or dry_run)
    elif not dry_run:
        raise OutputError("no output given; pass an output path (only a dry run may omit it)")
    with contextlib.ExitStack() as stack:
        ckpts = [
            stack.enter_context(
                open_checkpoint(
                    s.path,
                    key=s.key,
                    allow_globals=tuple(options.get("allow_globals", ())),
                    unsafe_pickle=options.get("unsafe_pickle", False),
                )
            )
            for s in specs
        ]
        opened = None
        if lora is not None:
            opened = open_lora(
                lora,
                allow_globals=tuple(options.get("allow_globals", ())),
                unsafe_pickle=options.get("unsafe_pickle", False),
            )
            ckpts.append(stack.enter_context(opened.ckpt))  # the plan's last source
        plan = build_plan(
            ckpts[: len(specs)],
            [s.rules for s in specs],
            mode=mode,
            labels=[str(s.path) for s in specs],
            on_conflict=on_conflict,
            weights=weights,
            dtype=dtype,
            keep_dtype=keep_dtype,
            adapters=options.get("adapters", ()),
            method=method,
            lora=opened,
        )
        report = None
        if gate is not None:
            report = gate.check(PlanSource(plan, ckpts))
            plan = plan.without(
                (m.key for m in report.dropped_mismatched), reason="--drop-mismatched"
            )
        result = SurgeryResult(
            plan, report, None if out is None else str(out), notes=tuple(plan.notes)
        )
        if dry_run:
            return result
        Gate.refuse(report, out)
        if not plan.entries:
            error = RuleError if mode == "remap" else MergeError
            raise error("the rules drop every key; there is nothing to write")
        assert out is not None and fmt is not None  # checked above
        metadata = None
        if fmt == "safetensors":  # a torch output is a flat state dict: no room for metadata
            extra = dict(provenance_extra or {})
            if gate is not None and mode != "remap":
                extra.setdefault("target", gate.to_dict())
            if opened is not None:
                extra["lora"] = opened.provenance()
            metadata = provenance(plan, ckpts, extra=extra)
        written, notes = execute(
            plan,
            ckpts,
            Path(out),
            fmt=fmt,
            metadata=metadata,
            overwrite=force,
            max_shard_size=shard_bytes,
            progress=options.get("progress"),
            verify=options.get("verify", True),
        )
    return replace(result, written=written, notes=result.notes + tuple(notes))
