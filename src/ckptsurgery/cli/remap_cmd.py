from __future__ import annotations

import click

from ckptsurgery.cli._common import F, echo_json, note, open_source, source_options
from ckptsurgery.io import check_output_path, output_format
from ckptsurgery.rules import Rules
from ckptsurgery.surgery import write_remapped
from ckptsurgery.tables import count, human_bytes, plan_table, rule_counts_table, table


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
    help="Output file; format from its extension (.safetensors, .pt, .pth, .bin).",
)
@rule_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "torch"]),
    default=None,
    help="Output format, when the extension does not say.",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--dry-run", is_flag=True, help="Print what would be done; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (and result) as JSON.")
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
    force: bool,
    dry_run: bool,
    as_json: bool,
    key: str | None,
    allow_globals: tuple[str, ...],
    unsafe_pickle: bool,
) -> None:
    """Filter and rename the keys of SRC and write the result to OUT.

    Rules apply in this order: --keep, --drop, --strip-prefix, --replace, --regex,
    --add-prefix. Tensors are copied bit-exactly; OUT is written atomically and SRC is never
    modified.

    \b
    Example (the backbone of a MoCo checkpoint):
      ckptsurgery remap moco_v2.pth.tar -o resnet50.safetensors \\
          --keep 'module.encoder_q.*' --drop 'module.encoder_q.fc.*' \\
          --strip-prefix module.encoder_q. --dry-run
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
    key = key or file_key
    if out is None and not dry_run:
        raise click.UsageError("Missing option '-o' / '--output' (only --dry-run may omit it).")
    if out is not None:
        # Check the output before reading anything, so a mistake costs nothing.
        fmt = output_format(out, fmt)
        check_output_path(out, inputs=[src], force=force or dry_run)
    with open_source(
        src, key=key, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
    ) as ckpt:
        plan = rules.plan(ckpt.infos)
        for rule in plan.unused_rules:
            note(f"note: {rule} matched no key")
        if dry_run:
            if as_json:
                echo_json(
                    {
                        "source": src,
                        "key": ckpt.key,
                        "output": out,
                        "rules": rules.to_dict(),
                        **plan.to_dict(),
                    }
                )
                return
            click.echo(plan_table(plan) if plan.renames else "(no key kept)")
            if plan.dropped:
                click.echo()
                click.echo(table(((k,) for k in plan.dropped), ("dropped",)))
            if plan.rule_counts:
                click.echo()
                click.echo(rule_counts_table(plan))
            note(
                f"dry run: would keep {len(plan.renames)} of {len(ckpt.infos)} keys "
                f"({len(plan.renamed)} renamed), drop {len(plan.dropped)}; nothing written"
            )
            return
        if not plan.renames:
            raise click.UsageError("the rules drop every key; nothing to write")
        assert out is not None and fmt is not None
        result = write_remapped(ckpt, plan, rules, out, fmt=fmt, overwrite=force)
    if as_json:
        echo_json(
            {
                "source": src,
                "key": ckpt.key,
                "output": out,
                "format": result.format,
                "tensors": result.tensors,
                "bytes": result.bytes,
                "rules": rules.to_dict(),
                **plan.to_dict(),
            }
        )
    note(
        f"kept {len(plan.renames)} of {len(ckpt.infos)} keys ({len(plan.renamed)} renamed), "
        f"dropped {len(plan.dropped)}; wrote {count(result.tensors, 'tensor')}, "
        f"{human_bytes(result.bytes)} to {out}"
    )
