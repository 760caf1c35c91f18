from __future__ import annotations

import shlex
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

# The output in the suggested remap command, for the user to replace.
OUT_PLACEHOLDER = "OUT.safetensors"


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
    command = ""
    if suggestion is not None:
        # The command carries what reading SRC needed, and the model as a gate, so that it
        # runs as printed and refuses to write a result that does not fit.
        extra = [w for g in allow_globals for w in ("--allow-global", g)]
        extra += ["--unsafe-pickle"] if unsafe_pickle else []
        if model_spec is not None:
            extra += ["--model", model_spec, *(w for a in model_args for w in ("--model-arg", a))]
            extra += [w for g in suggestion.allow_missing for w in ("--allow-missing", g)]
        command = suggestion.remap_command(src, OUT_PLACEHOLDER, key=key, extra=extra)
    if as_json:
        payload = report.to_json()
        if suggestion is not None:
            payload["suggestion"] = {
                **suggestion.to_dict(),
                "command": command or None,
                "toml": suggestion.toml() or None,
            }
        echo_json(payload)
    else:
        click.echo(report.table(matched=True))
        if suggestion is not None:
            click.echo()
            click.echo(render_suggestion(suggestion, command, gated=model_spec is not None))
    if report.compatible:
        return
    fixable = report.shape_mismatch or (report.missing and report.unexpected)
    if fixable and suggestion is None and not as_json:
        note("hint: --suggest infers the rules that rename or drop the keys that do not fit")
    raise click.exceptions.Exit(1)


def render_suggestion(s: Suggestion, command: str, *, gated: bool) -> str:
    """The suggestion as text: the command to paste, the TOML block, what stays unresolved.

    ``gated``: the command checks its result against the model (``--model``), allowing what
    stays missing.
    """
    lines: list[str] = []
    if s.rules is not None:
        dropped = s.matched_after == s.matched_before
        lines.append(
            f"suggested rules: {s.matched_after} of {s.model_keys} model tensors would match "
            f"(now {s.matched_before}"
            + ("; the rules drop the checkpoint keys the model cannot take)" if dropped else ")")
        )
        lines += ["", "  " + command, ""]
        lines.append("as a rules file (remap --rules FILE.toml):")
        lines += ["", *("  " + line for line in s.toml().splitlines()), ""]
        if s.missing_after:
            allowed = " ".join(f"--allow-missing {shlex.quote(g)}" for g in s.allow_missing)
            lines.append(
                "still missing with these rules: "
                + ", ".join(group_keys(s.missing_after))
                + (f" (allowed in the command: {allowed})" if gated else "")
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
