from __future__ import annotations

from typing import Any

import click

from ckptsurgery.cli._common import (
    allow_options,
    build_target,
    echo_json,
    model_options,
    note,
    selection_note,
    source_options,
    warnings_as_notes,
)
from ckptsurgery.keygroups import group_keys
from ckptsurgery.suggest import Suggestion
from ckptsurgery.surgery import diff


@click.command("diff")
@click.argument("src")
@model_options
@click.option(
    "--against",
    "ref",
    metavar="REF",
    default=None,
    help="Compare with another checkpoint instead of a model.",
)
@click.option("--ref-key", metavar="PATH", default=None, help="--key for REF.")
@allow_options
@click.option(
    "--suggest",
    "want_suggestion",
    is_flag=True,
    help="Also infer the rules that make the most keys match, as a remap command and TOML.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@source_options
def diff_cmd(
    src: str,
    model_spec: str | None,
    model_args: tuple[str, ...],
    ref: str | None,
    ref_key: str | None,
    allow_missing: tuple[str, ...],
    allow_unexpected: tuple[str, ...],
    want_suggestion: bool,
    as_json: bool,
    key: str | None,
    allow_globals: tuple[str, ...],
    unsafe_pickle: bool,
) -> None:
    """Check SRC against a model (or another checkpoint) before loading it.

    Lists the keys that match, the model keys the checkpoint lacks (missing), the checkpoint
    keys the model lacks (unexpected) and those whose shapes differ. The model is built on
    the meta device and no tensor data is read, so this is cheap for any size. Exit code 0
    when compatible (nothing missing, unexpected or mismatched beyond what --allow-missing /
    --allow-unexpected allow), 1 when not.

    \b
    Example:
      ckptsurgery diff moco_v2.pth.tar --model torchvision:resnet50 --suggest
      ckptsurgery diff backbone.safetensors --model torchvision:resnet50 \\
          --model-arg num_classes=10 --allow-missing 'fc.*' --json
    """
    if (model_spec is None) == (ref is None):
        raise click.UsageError("give exactly one of --model SPEC and --against REF")
    if model_args and model_spec is None:
        raise click.UsageError("--model-arg needs --model")
    target: Any = ref if ref is not None else build_target(str(model_spec), model_args)
    with warnings_as_notes():
        result = diff(
            src,
            target,
            key=key,
            target_key=ref_key,
            allow_missing=allow_missing,
            allow_unexpected=allow_unexpected,
            suggest=want_suggestion,
            allow_globals=allow_globals,
            unsafe_pickle=unsafe_pickle,
        )
    selection_note(result.source_key, key, result.other_entries)
    report, suggestion = result.report, result.suggestion
    for glob in report.unused_allow():
        note(f"note: allow glob {glob} matched no key")
    if as_json:
        payload = report.to_json()
        if suggestion is not None:
            payload["suggestion"] = {
                **suggestion.to_dict(),
                "command": suggestion.remap_command(src, "OUT") or None,
                "toml": suggestion.toml() or None,
            }
        echo_json(payload)
    else:
        if report.matched:
            click.echo(f"matched ({len(report.matched)}):")
            for line in group_keys(report.matched):
                click.echo(f"  {line}")
            click.echo()
        click.echo(report.table())
        if suggestion is not None:
            click.echo()
            click.echo(render_suggestion(suggestion, src))
    if not report.compatible:
        raise click.exceptions.Exit(1)


def render_suggestion(s: Suggestion, src: str) -> str:
    """The suggestion as text: the command to paste, the TOML block, what stays unresolved."""
    lines: list[str] = []
    if s.rules is not None:
        lines.append(
            f"suggested rules: {s.matched_after} of {s.model_keys} model tensors would match "
            f"(now {s.matched_before})"
        )
        lines += ["", "  " + s.remap_command(src, "OUT.safetensors"), ""]
        lines.append("as a rules file (remap --rules FILE.toml):")
        lines += ["", *("  " + line for line in s.toml().splitlines()), ""]
        if s.missing_after:
            lines.append(
                "still missing with these rules: " + ", ".join(group_keys(s.missing_after))
            )
        if s.unexpected_after:
            lines.append(
                "still unexpected with these rules: " + ", ".join(group_keys(s.unexpected_after))
            )
    elif not s.ambiguities:
        lines.append(
            "no rules found that would match more keys "
            f"({s.matched_before} of {s.model_keys} match as they are)"
        )
    lines += [f"note: {n}" for n in s.notes]
    lines += [f"ambiguous: {a}" for a in s.ambiguities]
    return "\n".join(lines).rstrip()
