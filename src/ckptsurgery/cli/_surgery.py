"""What remap, merge and apply share: the options of a surgery that writes, and the rendering
of its plan and result (tables or JSON on stdout, notes and the summary on stderr)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ckptsurgery.cli._common import build_target, echo_json, note, refusals, warnings_as_notes
from ckptsurgery.cli._options import GateFlags, WriteFlags
from ckptsurgery.keygroups import group_keys
from ckptsurgery.plan.table import plan_summary, plan_table
from ckptsurgery.render.progress import byte_progress

if TYPE_CHECKING:
    from ckptsurgery.plan.adapt import Adapter
    from ckptsurgery.plan.gate import Gate
    from ckptsurgery.plan.lora import LoraAdapter
    from ckptsurgery.plan.run import SurgeryResult
    from ckptsurgery.recipe import Target
    from ckptsurgery.rules import Rules


def surgery_command(
    command: str,
    write: WriteFlags,
    gate_flags: GateFlags,
    *,
    sources: Sequence[tuple[str, str | None, Rules]],
    run: Callable[..., SurgeryResult],
    given_key: str | None,
    recipe: Mapping[str, Any] | None = None,
    payload: Callable[[SurgeryResult], dict[str, Any]] | None = None,
    adapters: Sequence[Adapter] = (),
) -> None:
    """The body of remap and merge: check the flags, build the gate, call
    ``run(gate=..., progress=..., **library options)`` under the one refusal rendering,
    write the ``--emit-recipe`` (``recipe``: its ``[merge]`` settings), and render.
    ``adapters``: the shape adapters of ``--rows``, ``--in-chans``, ``--resample-pos-embed``."""
    inputs = [path for path, _, _ in sources]
    if write.out is None and not write.dry_run:
        raise click.UsageError("Missing option '-o' / '--output' (only --dry-run may omit it).")
    if write.emit_recipe is not None and write.out is None:
        raise click.UsageError("--emit-recipe needs -o / --output (the recipe's [output])")
    if write.keep_dtype and write.dtype is None:
        raise click.UsageError("--keep-dtype needs --dtype")
    if write.emit_recipe is not None:
        from ckptsurgery.io import check_output_path

        check_output_path(write.emit_recipe, inputs=inputs, force=write.force)
    gate = gate_from_flags(gate_flags)
    where = {"source": inputs[0]} if command == "remap" else {"sources": inputs}
    with (
        refusals(as_json=write.as_json, fmt=write.table_fmt, command=command, **where,
                 output=write.out),
        warnings_as_notes(),
        byte_progress(f"writing {Path(write.out or '').name}", write.progress) as on_progress,
    ):  # fmt: skip
        options = write.library_options()
        if adapters:
            options["adapters"] = tuple(adapters)
        result = run(gate=gate, progress=on_progress, **options)
    if write.emit_recipe is not None:
        assert write.out is not None  # checked above
        write_recipe(
            write.emit_recipe,
            sources,
            write.out,
            write,
            gate_flags,
            adapters=adapters,
            **(recipe or {}),
        )
    extra = payload(result) if payload is not None else {}
    if adapters:
        extra["adapters"] = [a.to_dict() for a in adapters]
    render(
        result,
        given_key=given_key,
        dry_run=write.dry_run,
        as_json=write.as_json,
        fmt=write.table_fmt,
        payload=extra or None,
    )


def gate_from_flags(flags: GateFlags) -> Gate | None:
    """The gate of ``--model`` and its allowances (None without ``--model``)."""
    given = flags.allow_missing or flags.allow_unexpected or flags.drop_mismatched
    if (given or flags.model_args) and flags.model_spec is None:
        raise click.UsageError(
            "--allow-missing, --allow-unexpected, --drop-mismatched and --model-arg need --model"
        )
    if flags.model_spec is None:
        return None
    from ckptsurgery.plan.gate import Gate

    return Gate(
        build_target(flags.model_spec, flags.model_args),
        allow_missing=flags.allow_missing,
        allow_unexpected=flags.allow_unexpected,
        drop_mismatched=flags.drop_mismatched,
    )


def target_of(flags: GateFlags) -> Target | None:
    """The gate as a recipe's ``[target]`` (and the provenance's), or None."""
    if flags.model_spec is None:
        return None
    from ckptsurgery.models import parse_model_args
    from ckptsurgery.recipe import Target

    return Target(
        flags.model_spec,
        parse_model_args(flags.model_args),
        allow_missing=flags.allow_missing,
        allow_unexpected=flags.allow_unexpected,
        drop_mismatched=flags.drop_mismatched,
    )


def write_recipe(
    path: str,
    sources: Sequence[tuple[str, str | None, Rules]],
    output: str,
    write: WriteFlags,
    gate_flags: GateFlags,
    *,
    on_conflict: str = "error",
    average: bool = False,
    weights: Sequence[float] = (),
    adapters: Sequence[Adapter] = (),
    method: Mapping[str, Any] | None = None,
    lora: Sequence[LoraAdapter] = (),
) -> None:
    """The run as a recipe that ``ckptsurgery apply`` reproduces, written atomically; paths
    are written relative to the recipe's folder, as ``apply`` reads them."""
    from ckptsurgery.io import atomic_write
    from ckptsurgery.recipe import recipe_toml

    text = recipe_toml(
        list(sources),
        target_of(gate_flags),
        output,
        recipe_dir=Path(path).resolve().parent,
        on_conflict=on_conflict,
        average=average,
        weights=list(weights),
        dtype=write.dtype,
        keep_dtype=list(write.keep_dtype),
        format=write.fmt,
        max_shard_size=write.max_shard_size,
        adapters=adapters,
        method=method,
        lora=lora,
    )
    with atomic_write(path, overwrite=write.force) as f:
        f.write(text.rstrip("\n").encode("utf-8") + b"\n")
    note(f"wrote the recipe to {path}; run: ckptsurgery apply {path}")


# --- rendering --------------------------------------------------------------------------------


def render(
    result: SurgeryResult,
    *,
    given_key: str | None,
    dry_run: bool,
    as_json: bool,
    fmt: str = "simple",
    plans: bool = False,
    payload: dict[str, Any] | None = None,
) -> None:
    """Print a surgery (stdout: tables or JSON; stderr: notes and the summary line); exit 1
    when a dry run does not fit the model. ``plans``: show every source's renames too."""
    plan = result.plan
    several = len(plan.sources) > 1
    for i, s in enumerate(plan.sources):
        if s.key and not given_key:
            others = ", ".join(s.other_entries) or "none"
            where = f"{s.path}: using" if several else "using"
            note(f"{where} the state dict at '{s.key}' (other entries: {others})")
        for rule in s.keys.unused_rules:
            note(
                f"note: source {i + 1} ({s.path}): {rule} matched no key"
                if several
                else f"note: {rule} matched no key"
            )
    if plan.conflicts:
        which = "first" if plan.on_conflict == "first" else "last"
        keys = group_keys(c.key for c in plan.conflicts)
        note(
            f"note: {len(plan.conflicts):,} key{'s' if len(plan.conflicts) != 1 else ''} in several "
            f"sources, each taken from the {which} source that has it: "
            f"{', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
        )
    for message in result.notes:
        note(f"note: {message}")
    report = result.report
    if report is not None:
        for glob in report.unused_allow():
            note(f"note: allow glob {glob} matched no key")

    if as_json:
        echo_json({**(payload or {}), **result.to_dict()})
    elif dry_run:
        click.echo(tables(result, plans=plans, fmt=fmt))
    if report is not None and not as_json:
        if dry_run:
            click.echo()
        click.echo(report.table(fmt=fmt))
    note(summary(result, dry_run=dry_run))
    if dry_run and not result.compatible:
        raise click.exceptions.Exit(1)


def tables(result: SurgeryResult, *, plans: bool, fmt: str = "simple") -> str:
    """A dry run's tables: the plan, what each source's rules did, then for merges the sources
    and conflicts."""
    from ckptsurgery.render.tables import rule_counts_table, table

    plan = result.plan
    parts: list[str] = [plan_table(plan, fmt=fmt, group=True) if plan.entries else "(no key kept)"]
    for i, s in enumerate(plan.sources):
        if plans or len(plan.sources) == 1:
            head = f"source {i + 1}: {s.path}" + (f" (key {s.key})" if s.key else "")
            if s.keys.dropped:
                dropped = group_keys(s.keys.dropped)
                parts.append(table(((k,) for k in dropped), ("dropped",), fmt=fmt))
            if s.keys.rule_counts:
                text = rule_counts_table(s.keys, fmt=fmt)
                parts.append(text if len(plan.sources) == 1 else f"{head}\n{text}")
    if plan.mode != "remap":
        parts.append(_sources_table(result, fmt=fmt))
        parts += _merge_tables(result, fmt=fmt)
    parts.append(plan_summary(plan))
    return "\n\n".join(parts)


def _sources_table(result: SurgeryResult, *, fmt: str) -> str:
    from ckptsurgery.render.tables import table

    plan = result.plan
    headers = ["#", "source", "key", "tensors", "kept", "taken"]
    rows: list[list[str]] = [
        [
            str(i + 1),
            s.path,
            s.key or "",
            f"{s.tensors:,}",
            f"{len(s.keys.renames):,}",
            f"{s.taken:,}",
        ]
        for i, s in enumerate(plan.sources)
    ]
    if plan.mode == "average":
        headers[-1] = "weight"
        for row, w in zip(rows, plan.weights or (), strict=True):
            row[-1] = f"{w:.4g}"
    elif plan.mode == "method" and plan.method is not None:
        headers[-1] = "weight"
        shown = ("base", *(f"{w:.4g}" for w in plan.method.param("weights", ())))
        for row, text in zip(rows, shown, strict=True):
            row[-1] = text
    return table(rows, headers, fmt=fmt)


def _merge_tables(result: SurgeryResult, *, fmt: str) -> list[str]:
    from ckptsurgery.render.tables import table

    plan = result.plan
    parts = []
    labels = [f"{i + 1} ({Path(s.path).name})" for i, s in enumerate(plan.sources)]
    if plan.conflicts:
        grouped: dict[tuple[tuple[int, ...], int], list[str]] = {}
        for c in plan.conflicts:
            grouped.setdefault((c.sources, c.taken_from), []).append(c.key)
        rows = [
            (g, ", ".join(labels[i] for i in srcs), labels[taken])
            for (srcs, taken), keys in grouped.items()
            for g in group_keys(keys)
        ]
        parts.append(table(rows, ("key in several sources", "sources", "taken from"), fmt=fmt))
    if result.copied:
        rows2 = ((g,) for g in group_keys(result.copied))
        parts.append(table(rows2, (f"integer / bool, copied from source {labels[0]}",), fmt=fmt))
    return parts


def summary(result: SurgeryResult, *, dry_run: bool) -> str:
    """The one line on stderr that says what was (or would be) done."""
    from ckptsurgery.render.tables import count, human_bytes

    plan = result.plan
    n = sum(1 for s in plan.sources if s.role == "source")
    if plan.mode == "remap":
        s = plan.sources[0]
        renamed = sum(1 for o, new in s.keys.renames if o != new)
        what = (
            f"{'would keep' if dry_run else 'kept'} {len(s.keys.renames)} of {s.tensors} keys "
            f"({renamed} renamed), {'drop' if dry_run else 'dropped'} {len(s.keys.dropped)}"
        )
    elif plan.mode == "average":
        weights = ", ".join(f"{w:.4g}" for w in plan.weights or ())
        copied = len(result.copied)
        what = (
            f"average of {n} sources (weights {weights}): "
            f"{count(len(plan.entries) - copied, 'tensor')} averaged"
            + (f", {copied} copied from the first" if copied else "")
        )
    elif plan.mode == "method" and plan.method is not None:
        copied = len(result.copied)
        what = (
            f"{plan.method.describe()} of {count(n - 1, 'model')} into "
            f"{Path(plan.sources[0].path).name}: {count(len(plan.entries) - copied, 'tensor')} "
            "merged" + (f", {copied} copied from the base" if copied else "")
        )
    else:
        taken = ", ".join(
            f"{Path(s.path).name} {s.taken:,}" for s in plan.sources if s.role == "source"
        )
        what = f"union of {n} source{'s' if n != 1 else ''}: {count(len(plan.entries), 'tensor')} ({taken})"
        if plan.conflicts:
            what += f", {count(len(plan.conflicts), 'conflict')} resolved ({plan.on_conflict})"
    folded = sum(1 for e in plan.entries if e.op.name == "lora-fold")
    if folded:
        lora = next(s for s in plan.sources if s.role == "lora")
        what += f", {count(folded, 'tensor')} LoRA-folded from {lora.path}"
    if plan.cast:
        what += f", {count(len(plan.cast), 'tensor')} cast to {plan.dtype}"
    report = result.report
    verdict = (
        ""
        if report is None
        else "; fits the model"
        if report.compatible
        else "; does NOT fit the model"
    )
    if dry_run:
        return f"dry run: {what}{verdict}; nothing written"
    assert result.written is not None
    written = result.written
    shards = f" in {written.shards} shards" if written.path.is_dir() else ""
    return (
        f"{what}{verdict}; wrote {count(written.tensors, 'tensor')}, "
        f"{human_bytes(written.bytes)}{shards} to {result.output}"
    )
