from __future__ import annotations

import json
from typing import Any

import click

from ckptsurgery.cli._common import echo_json, note, open_source, refusals
from ckptsurgery.cli._options import fmt_option, source_options
from ckptsurgery.describe import describe, describe_candidates
from ckptsurgery.errors import StateDictSelectionError
from ckptsurgery.render.tables import (
    count,
    groups_table,
    human_bytes,
    mapping_table,
    table,
    tensors_table,
)


@click.command("inspect")
@click.argument("src")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@fmt_option
@click.option(
    "--depth",
    type=click.IntRange(min=1),
    default=None,
    help="Group keys by their first N dotted parts, with tensor and parameter counts.",
)
@click.option(
    "--verify-source",
    "verify_sources",
    multiple=True,
    metavar="PATH",
    help="Recompute PATH's digest and compare it with the one SRC's provenance records for "
    "the source of that name (exit 1 unless every one matches). Repeatable.",
)
@source_options
def inspect_cmd(
    src: str,
    as_json: bool,
    fmt: str,
    depth: int | None,
    verify_sources: tuple[str, ...],
    key: str | None,
    allow_globals: tuple[str, ...],
    unsafe_pickle: bool,
) -> None:
    """List the tensors of a checkpoint: key, shape, dtype, number of elements, totals.

    Only headers are read where the format allows (safetensors; a torch archive's data.pkl,
    whose CRC-32 is checked), so this is fast on any size. Tensor bytes are not read, so a
    damaged tensor record goes unnoticed here: `ckptsurgery scan` checks every record.

    \b
    Example:
      ckptsurgery inspect moco_v2.pth.tar
      ckptsurgery inspect model.safetensors --depth 1 --json
      ckptsurgery inspect model.safetensors --fmt github
      ckptsurgery inspect resnet50.safetensors --verify-source moco_v2.pth.tar
    """
    with refusals(as_json=as_json, fmt=fmt, command="inspect", source=src):
        try:
            ckpt = open_source(
                src, key=key, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
            )
        except StateDictSelectionError as e:
            if key is not None or len(e.candidates) < 2:
                raise
            # Several state dicts: inspect's job is to show what is there.
            report = describe_candidates(
                src, e.candidates, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
            )
            if as_json:
                echo_json(report)
            else:
                click.echo(render_candidates(report, fmt=fmt))
            return
    with (
        refusals(as_json=as_json, fmt=fmt, command="inspect", source=src),
        ckpt,
    ):
        report = describe(ckpt, depth=depth)
        checks = []
        if verify_sources:
            from ckptsurgery.plan.provenance import check_sources

            checks = check_sources(ckpt.metadata, verify_sources)
            report["verify_sources"] = [c.to_json() for c in checks]
    failed = [c for c in checks if not c.ok]
    if as_json:
        echo_json(report)
        if failed:
            raise click.exceptions.Exit(1)
        return
    click.echo(
        f"source: {report['source']}  format: {report['format']}"
        + (f"  key: {report['key']}" if report["key"] else "")
    )
    click.echo()
    if depth is not None:
        click.echo(groups_table(report["groups"], fmt=fmt))
    else:
        click.echo(tensors_table(ckpt.infos, ckpt.aliases, fmt=fmt))
    click.echo()
    tied = f", {len(report['tied'])} tied" if report["tied"] else ""
    click.echo(
        f"{count(len(report['tensors']), 'tensor')}{tied}, "
        f"{count(report['total_params'], 'parameter')}, {human_bytes(report['total_bytes'])}"
    )
    if report["other_entries"]:
        click.echo()
        click.echo(mapping_table(report["other_entries"], ("other entry", "type"), fmt=fmt))
    if report["provenance"]:
        click.echo()
        click.echo("provenance:")
        for name, value in report["provenance"].items():
            text = value if isinstance(value, str) else json.dumps(value)
            click.echo(f"  {name}: {text}")
    if checks:
        click.echo()
        rows = [
            (
                c.path,
                c.algorithm or "-",
                c.recorded or "(no source of that name)",
                c.computed or "-",
                "ok" if c.ok else "DIFFERS",
            )
            for c in checks
        ]
        headers = ("source", "digest", "recorded", "computed", "")
        click.echo(table(rows, headers, fmt=fmt))
    for c in failed:
        what = "is not a recorded source" if c.recorded is None else "differs from the recorded one"
        note(f"{c.path}: {what}")
    if failed:
        raise click.exceptions.Exit(1)


def render_candidates(report: dict[str, Any], *, fmt: str) -> str:
    """The state dicts of a file that holds several, and how to pick one."""
    rows = [
        (
            c["key"],
            count(c["tensors"], "tensor"),
            count(c["params"], "parameter"),
            human_bytes(c["bytes"]),
        )
        for c in report["candidates"]
    ]
    lines = [
        f"source: {report['source']}  format: {report['format']}",
        "",
        f"{len(rows)} state dicts in this file:",
        table(rows, ("--key", "tensors", "parameters", "bytes"), fmt=fmt),
        "",
        "other commands pick none of them by themselves: give --key, e.g. "
        f"ckptsurgery inspect {report['source']} --key {report['preferred'] or rows[0][0]}",
    ]
    if report["preferred"]:
        lines.append(
            f"--key {report['preferred']} holds the EMA / teacher weights, what fine-tuning "
            "usually starts from; `diff --model SPEC --suggest` matches each against a model"
        )
    if report["other_entries"]:
        lines += ["", mapping_table(report["other_entries"], ("other entry", "type"), fmt=fmt)]
    return "\n".join(lines)
