from __future__ import annotations

import click

from ckptsurgery.cli._common import (
    F,
    allow_options,
    build_target,
    echo_json,
    max_shard_size_option,
    model_options,
    note,
    selection_note,
    source_options,
    verify_option,
    warnings_as_notes,
)
from ckptsurgery.errors import IncompatibleCheckpoint
from ckptsurgery.match import MatchReport
from ckptsurgery.render.tables import count, human_bytes, plan_table, rule_counts_table, table
from ckptsurgery.rules import Rules
from ckptsurgery.surgery import Gate, remap


def rule_options(f: F) -> F:
    """The rule flags, in the order the rules apply."""
    opts = [
        click.option(
            "--keep",
            multiple=True,
            metavar="GLOB",
            help="Keep only keys matching a glob ('*' matches dots too). Repeatable.",
        ),
        click.option(
            "--drop", multiple=True, metavar="GLOB", help="Remove keys matching a glob. Repeatable."
        ),
        click.option(
            "--strip-prefix",
            multiple=True,
            metavar="P",
            help="Remove a leading prefix. Repeatable, applied in order.",
        ),
        click.option(
            "--replace",
            multiple=True,
            nargs=2,
            metavar="OLD NEW",
            help="Replace a substring. Repeatable, applied in order.",
        ),
        click.option(
            "--regex",
            multiple=True,
            nargs=2,
            metavar="PATTERN REPL",
            help="re.sub on the key. Repeatable, applied in order.",
        ),
        click.option("--add-prefix", default="", metavar="P", help="Prepend to every key."),
        click.option(
            "--rules",
            "rules_file",
            metavar="FILE.toml",
            default=None,
            help="Read the rules from a TOML file (keys as a recipe's [[source]]); "
            "flags given too are applied after the file's.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def build_rules(
    *,
    keep: tuple[str, ...],
    drop: tuple[str, ...],
    strip_prefix: tuple[str, ...],
    replace: tuple[tuple[str, str], ...],
    regex: tuple[tuple[str, str], ...],
    add_prefix: str,
    rules_file: str | None,
) -> tuple[Rules, str | None]:
    flags = Rules(
        keep=keep,
        drop=drop,
        strip_prefix=strip_prefix,
        replace=replace,
        regex=regex,
        add_prefix=add_prefix,
    )
    if rules_file is None:
        return flags, None
    from_file, key = Rules.from_toml(rules_file)
    return from_file | flags, key


@click.command("remap")
@click.argument("src")
@click.option(
    "-o",
    "--output",
    "out",
    metavar="OUT",
    default=None,
    help="Output file; format from its extension (.safetensors, .pt, .pth, .bin). "
    "With --max-shard-size, a folder (or its model.safetensors.index.json).",
)
@rule_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "torch"]),
    default=None,
    help="Output format, when the extension does not say.",
)
@max_shard_size_option
@click.option(
    "--progress/--no-progress",
    default=None,
    help="A progress line on stderr while writing (default: for big writes on a terminal).",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@verify_option
@click.option("--dry-run", is_flag=True, help="Print what would be done; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (and result) as JSON.")
@model_options
@allow_options
@click.option(
    "--drop-mismatched",
    is_flag=True,
    help="With --model: drop keys whose shape differs from the model's (they become missing).",
)
@source_options
def remap_cmd(
    src: str,
    out: str | None,
    keep: tuple[str, ...],
    drop: tuple[str, ...],
    strip_prefix: tuple[str, ...],
    replace: tuple[tuple[str, str], ...],
    regex: tuple[tuple[str, str], ...],
    add_prefix: str,
    rules_file: str | None,
    fmt: str | None,
    max_shard_size: str | None,
    progress: bool | None,
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
    """Filter and rename the keys of SRC and write the result to OUT.

    Rules apply in this order: --keep, --drop, --strip-prefix, --replace, --regex,
    --add-prefix. Tensors are copied bit-exactly; OUT is written atomically and SRC is never
    modified.

    With --model, the renamed keys are first matched against the model (as `diff` does): the
    report is printed and nothing is written (exit 1) unless they fit, allowing the keys given
    with --allow-missing / --allow-unexpected.

    \b
    Example (the backbone of a MoCo checkpoint, checked against the model first):
      ckptsurgery remap moco_v2.pth.tar -o resnet50.safetensors \\
          --keep 'module.encoder_q.*' --drop 'module.encoder_q.fc.*' \\
          --strip-prefix module.encoder_q. \\
          --model torchvision:resnet50 --allow-missing 'fc.*'

    \b
    Example (a sharded Hugging Face checkpoint, resharded into 5 GB safetensors shards):
      ckptsurgery remap llama-7b/ -o llama-7b-st/ --max-shard-size 5GB
    """
    rules, file_key = build_rules(
        keep=keep,
        drop=drop,
        strip_prefix=strip_prefix,
        replace=replace,
        regex=regex,
        add_prefix=add_prefix,
        rules_file=rules_file,
    )
    if out is None and not dry_run:
        raise click.UsageError("Missing option '-o' / '--output' (only --dry-run may omit it).")
    gate_flags = allow_missing or allow_unexpected or drop_mismatched or model_args
    if gate_flags and model_spec is None:
        raise click.UsageError(
            "--allow-missing, --allow-unexpected, --drop-mismatched and --model-arg need --model"
        )
    gate = None
    if model_spec is not None:
        gate = Gate(
            build_target(model_spec, model_args),
            allow_missing=allow_missing,
            allow_unexpected=allow_unexpected,
            drop_mismatched=drop_mismatched,
        )
    try:
        with warnings_as_notes():
            result = remap(
                src,
                out,
                rules,
                key=key or file_key,
                format=fmt,
                force=force,
                dry_run=dry_run,
                gate=gate,
                allow_globals=allow_globals,
                unsafe_pickle=unsafe_pickle,
                max_shard_size=max_shard_size,
                progress=progress,
                verify=not no_verify,
            )
    except IncompatibleCheckpoint as e:
        _unused_allow_notes(e.report)
        if as_json:
            echo_json(
                {"source": src, "output": out, "written": False, "report": e.report.to_json()}
            )
        else:
            click.echo(e.report.table())
        note(f"{e}; nothing written")
        raise click.exceptions.Exit(1) from None
    selection_note(result.source_key, key or file_key, result.other_entries)
    plan = result.plan
    for rule in plan.unused_rules:
        note(f"note: {rule} matched no key")
    report = result.report
    if report is not None:
        _unused_allow_notes(report)

    if as_json:
        payload = {
            "source": src,
            "key": result.source_key,
            "output": out,
            "rules": rules.to_dict(),
            **plan.to_dict(),
        }
        if report is not None:
            payload["report"] = report.to_json()
        if result.written is not None:
            payload.update(
                written=True,
                format=result.written.format,
                tensors=result.written.tensors,
                bytes=result.written.bytes,
            )
        echo_json(payload)
    elif dry_run:
        click.echo(plan_table(plan) if plan.renames else "(no key kept)")
        if plan.dropped:
            click.echo()
            click.echo(table(((k,) for k in plan.dropped), ("dropped",)))
        if plan.rule_counts:
            click.echo()
            click.echo(rule_counts_table(plan))
    if report is not None and not as_json:
        if dry_run:
            click.echo()
        click.echo(report.table())

    counts = (
        f"{len(plan.renames)} of {result.source_keys} keys ({len(plan.renamed)} renamed), "
        f"{'drop' if dry_run else 'dropped'} {len(plan.dropped)}"
    )
    if dry_run:
        verdict = (
            ""
            if report is None
            else "; fits the model"
            if report.compatible
            else ("; does NOT fit the model")
        )
        note(f"dry run: would keep {counts}{verdict}; nothing written")
        if not result.compatible:
            raise click.exceptions.Exit(1)
        return
    assert result.written is not None
    shards = f" in {result.written.shards} shards" if max_shard_size is not None else ""
    note(
        f"kept {counts}; wrote {count(result.written.tensors, 'tensor')}, "
        f"{human_bytes(result.written.bytes)}{shards} to {out}"
    )


def _unused_allow_notes(report: MatchReport) -> None:
    for glob in report.unused_allow():
        note(f"note: allow glob {glob} matched no key")
