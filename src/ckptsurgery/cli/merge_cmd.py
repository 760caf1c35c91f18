from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ckptsurgery.cli._common import (
    allow_options,
    build_target,
    echo_json,
    max_shard_size_option,
    model_options,
    note,
    source_options,
    verify_option,
    warnings_as_notes,
)
from ckptsurgery.errors import IncompatibleCheckpoint
from ckptsurgery.keygroups import group_keys
from ckptsurgery.merge import MergeResult, average_files, merge_files
from ckptsurgery.models import parse_model_args
from ckptsurgery.render.tables import count, human_bytes, plan_table, rule_counts_table, table
from ckptsurgery.surgery import Gate

_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class _MergeCommand(click.Command):
    """``--weights 0.5 0.3 0.2``: click options take a fixed number of values, so the numbers
    that follow ``--weights`` are gathered into one value before click parses the line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, gather_weights(args))


def gather_weights(args: Sequence[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            out.extend(args[i:])
            break
        if word == "--weights":
            j = i + 1
            while j < len(args) and _NUMBER.match(args[j]):
                j += 1
            if j > i + 1:
                out.append("--weights=" + ",".join(args[i + 1 : j]))
                i = j
                continue
        out.append(word)
        i += 1
    return out


def parse_weights(values: Sequence[str]) -> list[float] | None:
    weights: list[float] = []
    for value in values:
        for word in re.split(r"[,\s]+", value.strip()):
            if not word:
                continue
            try:
                weights.append(float(word))
            except ValueError:
                raise click.BadParameter(
                    f"{word!r} is not a number", param_hint="'--weights'"
                ) from None
    return weights or None


@click.command("merge", cls=_MergeCommand)
@click.argument("sources", metavar="SRC...", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    "out",
    metavar="OUT",
    default=None,
    help="Output file; format from its extension (.safetensors, .pt, .pth, .bin). "
    "With --max-shard-size, a folder (or its model.safetensors.index.json).",
)
@click.option(
    "--on-conflict",
    type=click.Choice(["error", "first", "last"]),
    default=None,
    help="A key in several sources: an error (default), or taken from the first / last "
    "source that has it.",
)
@click.option(
    "--average",
    is_flag=True,
    help="Write the elementwise mean instead of the union (same keys and shapes needed).",
)
@click.option(
    "--weights",
    "weights_text",
    multiple=True,
    metavar="W...",
    help="With --average: one positive weight per source, in order (normalised to sum 1), "
    "e.g. --weights 0.5 0.3 0.2 or --weights 0.5,0.3,0.2.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "torch"]),
    default=None,
    help="Output format, when the extension does not say.",
)
@max_shard_size_option
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@verify_option
@click.option("--dry-run", is_flag=True, help="Print what would be done; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@model_options
@allow_options
@click.option(
    "--drop-mismatched",
    is_flag=True,
    help="With --model: drop keys whose shape differs from the model's (they become missing).",
)
@source_options
def merge_cmd(
    sources: tuple[str, ...],
    out: str | None,
    on_conflict: str | None,
    average: bool,
    weights_text: tuple[str, ...],
    fmt: str | None,
    max_shard_size: str | None,
    force: bool,
    no_verify: bool,
    dry_run: bool,
    as_json: bool,
    model_spec: str | None,
    model_args: tuple[str, ...],
    allow_missing: tuple[str, ...],
    allow_unexpected: tuple[str, ...],
    drop_mismatched: bool,
    key: str | None,
    allow_globals: tuple[str, ...],
    unsafe_pickle: bool,
) -> None:
    """Merge checkpoints: the union of their keys, or with --average their elementwise mean.

    Union: a key found in several sources is an error unless --on-conflict first|last says
    which source it comes from. Tensors are copied bit-exactly.

    --average: every source needs the same keys and shapes. Floating tensors are averaged in
    float32 or wider and stored in the source dtype; integer and bool tensors (e.g.
    num_batches_tracked) are taken from the first source. Tensors are read one at a time.

    --key applies to every source (use a recipe, `ckptsurgery apply`, for per-source keys and
    rules). A safetensors OUT records where every tensor came from (see `inspect`).

    \b
    Example:
      ckptsurgery merge backbone.safetensors head.safetensors -o model.safetensors
      ckptsurgery merge run1.pt run2.pt run3.pt --average --weights 0.5 0.3 0.2 \\
          -o soup.safetensors
      ckptsurgery merge backbone.safetensors head.safetensors -o model/ --max-shard-size 5GB
    """
    if out is None and not dry_run:
        raise click.UsageError("Missing option '-o' / '--output' (only --dry-run may omit it).")
    weights = parse_weights(weights_text)
    if weights is not None and not average:
        raise click.UsageError("--weights needs --average")
    if average and on_conflict is not None:
        raise click.UsageError("--on-conflict does not apply with --average")
    gate_flags = allow_missing or allow_unexpected or drop_mismatched or model_args
    if gate_flags and model_spec is None:
        raise click.UsageError(
            "--allow-missing, --allow-unexpected, --drop-mismatched and --model-arg need --model"
        )
    gate = None
    provenance: dict[str, Any] = {}
    if model_spec is not None:
        gate = Gate(
            build_target(model_spec, model_args),
            allow_missing=allow_missing,
            allow_unexpected=allow_unexpected,
            drop_mismatched=drop_mismatched,
        )
        provenance["target"] = {
            "model": model_spec,
            "model_args": parse_model_args(model_args),
            "allow_missing": list(allow_missing),
            "allow_unexpected": list(allow_unexpected),
            "drop_mismatched": drop_mismatched,
        }
    common: dict[str, Any] = {
        "provenance": provenance,
        "key": key,
        "format": fmt,
        "force": force,
        "dry_run": dry_run,
        "gate": gate,
        "allow_globals": allow_globals,
        "unsafe_pickle": unsafe_pickle,
        "verify": not no_verify,
        "max_shard_size": max_shard_size,
    }
    try:
        with warnings_as_notes():
            if average:
                result = average_files(list(sources), out, weights=weights, **common)
            else:
                result = merge_files(
                    list(sources), out, on_conflict=on_conflict or "error", **common
                )
    except IncompatibleCheckpoint as e:
        refused(e, as_json=as_json, payload={"output": out})
        raise click.exceptions.Exit(1) from None
    render(result, given_key=key, dry_run=dry_run, as_json=as_json)


def refused(e: IncompatibleCheckpoint, *, as_json: bool, payload: dict[str, Any]) -> None:
    """The gate refused to write: its report, then why on stderr."""
    if as_json:
        echo_json({**payload, "written": False, "report": e.report.to_json()})
    else:
        click.echo(e.report.table())
    note(f"{e}; nothing written")


def render(
    result: MergeResult,
    *,
    given_key: str | None,
    dry_run: bool,
    as_json: bool,
    plans: bool = False,
    payload: dict[str, Any] | None = None,
) -> None:
    """Print a merge (stdout: tables or JSON; stderr: notes and the summary line); exit 1 when
    a dry run does not fit the model. ``plans``: show every source's rename plan too."""
    for i, s in enumerate(result.sources):
        if s.key and not given_key:
            others = ", ".join(s.other_entries) or "none"
            note(f"{s.path}: using the state dict at '{s.key}' (other entries: {others})")
        for rule in s.plan.unused_rules:
            note(f"note: source {i + 1} ({s.path}): {rule} matched no key")
    if result.conflicts:
        which = "first" if result.on_conflict == "first" else "last"
        keys = group_keys(c.key for c in result.conflicts)
        note(
            f"note: {count(len(result.conflicts), 'key')} in several sources, each taken from "
            f"the {which} source that has it: {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
        )
    for message in result.notes:
        note(f"note: {message}")
    report = result.report
    if report is not None:
        for glob in report.unused_allow():
            note(f"note: allow glob {glob} matched no key")

    if as_json:
        echo_json({**(payload or {}), **result.to_dict()})
    else:
        if dry_run:
            click.echo(tables(result, plans=plans))
        if report is not None:
            if dry_run:
                click.echo()
            click.echo(report.table())
    note(summary(result, dry_run=dry_run))
    if dry_run and not result.compatible:
        raise click.exceptions.Exit(1)


def tables(result: MergeResult, *, plans: bool) -> str:
    """A dry run's tables: the sources (and their plans), then conflicts or what is copied."""
    parts: list[str] = []
    if plans:
        for i, s in enumerate(result.sources):
            head = f"source {i + 1}: {s.path}" + (f" (key {s.key})" if s.key else "")
            body = plan_table(s.plan) if s.plan.renames else "(no key kept)"
            parts.append(f"{head}\n{body}")
            if s.plan.dropped:
                parts.append(table(((k,) for k in group_keys(s.plan.dropped)), ("dropped",)))
            if s.plan.rule_counts:
                parts.append(rule_counts_table(s.plan))
    headers = ["#", "source", "key", "tensors", "kept", "taken"]
    rows: list[list[str]] = [
        [
            str(i + 1),
            s.path,
            s.key or "",
            f"{s.tensors:,}",
            f"{len(s.plan.renames):,}",
            f"{s.taken:,}",
        ]
        for i, s in enumerate(result.sources)
    ]
    if result.mode == "average":
        headers[-1] = "weight"
        for row, w in zip(rows, result.weights or (), strict=True):
            row[-1] = f"{w:.4g}"
    parts.append(table(rows, headers))
    labels = [f"{i + 1} ({Path(s.path).name})" for i, s in enumerate(result.sources)]
    if result.conflicts:
        grouped: dict[tuple[tuple[int, ...], int], list[str]] = {}
        for c in result.conflicts:
            grouped.setdefault((c.sources, c.taken_from), []).append(c.key)
        conflict_rows = [
            (g, ", ".join(labels[i] for i in srcs), labels[taken])
            for (srcs, taken), keys in grouped.items()
            for g in group_keys(keys)
        ]
        parts.append(table(conflict_rows, ("key in several sources", "sources", "taken from")))
    if result.copied:
        rows2 = ((g,) for g in group_keys(result.copied))
        parts.append(table(rows2, (f"integer / bool, copied from source {labels[0]}",)))
    return "\n\n".join(parts)


def summary(result: MergeResult, *, dry_run: bool) -> str:
    n = len(result.sources)
    if result.mode == "average":
        weights = ", ".join(f"{w:.4g}" for w in result.weights or ())
        copied = len(result.copied)
        what = (
            f"average of {n} sources (weights {weights}): "
            f"{count(len(result.names) - copied, 'tensor')} averaged"
            + (f", {copied} copied from the first" if copied else "")
        )
    else:
        taken = ", ".join(f"{Path(s.path).name} {s.taken:,}" for s in result.sources)
        what = f"union of {n} source{'s' if n != 1 else ''}: {count(len(result.names), 'tensor')} ({taken})"
        if result.conflicts:
            what += f", {count(len(result.conflicts), 'conflict')} resolved ({result.on_conflict})"
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
