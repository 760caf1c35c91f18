from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import click

from ckptsurgery.cli._common import (
    build_target,
    echo_json,
    note,
    refusals,
    selection_note,
    warnings_as_notes,
)
from ckptsurgery.cli._options import (
    allow_options,
    fmt_option,
    model_options,
    rule_options,
    source_options,
)
from ckptsurgery.cli._values import ValueFlags, run_values, value_options
from ckptsurgery.io import atomic_write, check_output_path
from ckptsurgery.keygroups import group_keys
from ckptsurgery.render.tables import human_bytes, table
from ckptsurgery.rules import Rules
from ckptsurgery.suggest import Suggestion
from ckptsurgery.surgery import DiffResult, diff

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
@rule_options
@allow_options
@click.option(
    "--suggest",
    "want_suggestion",
    is_flag=True,
    help="Also infer the rules that make the most keys match, as a remap command and TOML.",
)
@click.option(
    "--emit-recipe",
    metavar="FILE.toml",
    default=None,
    help="With --suggest: also write the suggested rules (and the model as the gate) as a "
    "recipe that `ckptsurgery apply` runs unchanged; written even when no rule is needed.",
)
@click.option("--force", is_flag=True, help="Replace an existing --emit-recipe (or --plot) FILE.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@fmt_option
@value_options
@source_options
def diff_cmd(
    src: str,
    model_spec: str | None,
    model_args: tuple[str, ...],
    ref: str | None,
    ref_key: str | None,
    rules: Rules,
    rules_key: str | None,
    allow_missing: tuple[str, ...],
    allow_unexpected: tuple[str, ...],
    want_suggestion: bool,
    emit_recipe: str | None,
    force: bool,
    as_json: bool,
    fmt: str,
    values: ValueFlags,
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

    The rule options of remap (--keep, --drop, --strip-prefix, --replace, --regex,
    --add-prefix, --rules FILE) rename the keys before the match, so rules are tried here
    without writing anything; --suggest then starts from them. With several nested state
    dicts, --suggest matches each against the model and goes on with the one it recommends.

    \b
    Example:
      ckptsurgery diff moco_v2.pth.tar --model torchvision:resnet50 --suggest
      ckptsurgery diff moco_v2.pth.tar --model torchvision:resnet50 --suggest \\
          --emit-recipe moco.toml && ckptsurgery apply moco.toml
      ckptsurgery diff backbone.safetensors --model torchvision:resnet50 \\
          --model-arg num_classes=10 --allow-missing 'fc.*' --json
      ckptsurgery diff craft.pth --model torchvision:vgg16_bn \\
          --regex '^module\\.net\\.slice\\d+\\.' features. --suggest
      ckptsurgery diff model-bf16.safetensors --against model.safetensors --values \\
          --sort rel_l2 --top 10 --plot change.png
      ckptsurgery diff converted.pt --against original.safetensors --atol 1e-6 --rtol 1e-5

    With --values (or any option that implies it) the tensors' values are compared with
    REF's, one pair at a time, after the rules: see --values. --atol/--rtol or --bit-equal
    make that a check that exits 1 when a tensor falls outside, naming the worst ones.
    """
    key = key or rules_key
    if values.wanted:
        if ref is None or model_spec is not None:
            raise click.UsageError("--values compares two checkpoints: give --against REF")
        if want_suggestion or emit_recipe is not None:
            raise click.UsageError("--suggest and --emit-recipe do not go with --values")
        run_values(
            src,
            ref,
            values,
            key=key,
            ref_key=ref_key,
            rules=rules,
            allow_missing=allow_missing,
            allow_unexpected=allow_unexpected,
            as_json=as_json,
            fmt=fmt,
            force=force,
            allow_globals=allow_globals,
            unsafe_pickle=unsafe_pickle,
        )
        return
    if (model_spec is None) == (ref is None):
        raise click.UsageError("give exactly one of --model SPEC and --against REF")
    if model_args and model_spec is None:
        raise click.UsageError("--model-arg needs --model")
    if emit_recipe is not None:
        if not want_suggestion:
            raise click.UsageError("--emit-recipe writes the suggested rules: add --suggest")
        # Refuse before any work rather than after it.
        check_output_path(emit_recipe, inputs=[src], force=force)
    target: Any = ref if ref is not None else build_target(str(model_spec), model_args)
    with (
        refusals(as_json=as_json, fmt=fmt, command="diff", source=src),
        warnings_as_notes(),
    ):
        result = diff(
            src,
            target,
            key=key,
            target_key=ref_key,
            rules=rules,
            allow_missing=allow_missing,
            allow_unexpected=allow_unexpected,
            suggest=want_suggestion,
            allow_globals=allow_globals,
            unsafe_pickle=unsafe_pickle,
        )
    selection_note(result.source_key, key, result.other_entries)
    if result.candidates:
        # Several state dicts: the one recommended is used, and every command made here
        # names it, so that it runs as printed.
        key = result.source_key
        if as_json:  # the tables say it otherwise
            note(f"recommended --key {result.recommendation}")
    report, suggestion = result.report, result.suggestion
    for rule, n in result.rule_counts:
        if n == 0:
            note(f"note: rule {rule} matched no key")
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
    if emit_recipe is not None and suggestion is not None:
        write_suggested_recipe(
            emit_recipe, src, key, suggestion, model_spec, model_args, force=force
        )
        note(f"wrote the suggested recipe to {emit_recipe}; run: ckptsurgery apply {emit_recipe}")
    if as_json:
        payload = report.to_json()
        if suggestion is not None:
            payload["suggestion"] = {
                **suggestion.to_dict(),
                "command": command or None,
                "toml": suggestion.toml() or None,
            }
        if result.candidates:
            payload["candidates"] = [c.to_dict() for c in result.candidates]
            chosen, _, reason = result.recommendation.partition(": ")
            payload["recommended"] = {"key": chosen, "reason": reason}
        echo_json(payload)
    else:
        if result.candidates:
            click.echo(render_candidates(result, fmt=fmt))
            click.echo()
        click.echo(report.table(matched=True, fmt=fmt))
        if suggestion is not None:
            click.echo()
            click.echo(render_suggestion(suggestion, command, gated=model_spec is not None))
    if report.compatible:
        return
    fixable = report.shape_mismatch or (report.missing and report.unexpected)
    if fixable and suggestion is None and not as_json:
        note("hint: --suggest infers the rules that rename or drop the keys that do not fit")
    raise click.exceptions.Exit(1)


def render_candidates(result: DiffResult, *, fmt: str) -> str:
    """The nested state dicts, how each fits, and the one recommended."""
    rows = [
        (
            c.key,
            c.tensors,
            human_bytes(c.bytes),
            f"{c.matched} of {c.model_keys}",
            f"{c.matched_with_rules} of {c.model_keys}",
            "yes" if c.fits else "no",
        )
        for c in result.candidates
    ]
    headers = ("state dict (--key)", "tensors", "bytes", "matched", "with rules", "fits")
    chosen, _, reason = result.recommendation.partition(": ")
    return (
        "several state dicts in the file, each matched against the model:\n"
        + table(rows, headers, fmt=fmt)
        + f"\n\nusing --key {chosen}: {reason}"
    )


def write_suggested_recipe(
    path: str,
    src: str,
    key: str | None,
    suggestion: Suggestion,
    model_spec: str | None,
    model_args: tuple[str, ...],
    *,
    force: bool,
) -> None:
    """The suggestion as a recipe: the source with its rules, the model as the gate.

    Written also when no rule is needed (the recipe then holds the ``--key`` choice and the
    output), so that ``diff --suggest --emit-recipe R && apply R`` always works; the adapters
    it proposes are ``[[adapt]]`` tables of the recipe.
    """
    from ckptsurgery.errors import RuleError
    from ckptsurgery.models import parse_model_args
    from ckptsurgery.recipe import Target, recipe_toml

    if suggestion.rules is None and (suggestion.ambiguities or suggestion.alternatives):
        raise RuleError("no recipe written: the suggestion is ambiguous")
    rules = suggestion.rules or Rules()
    target = None
    if model_spec is not None:
        target = Target(
            model_spec, parse_model_args(model_args), allow_missing=suggestion.allow_missing
        )
    # The output goes beside the recipe; paths are written relative to the recipe's folder.
    folder = Path(path).resolve().parent
    stem = Path(src).name.split(".")[0] or "checkpoint"
    output = os.path.relpath(folder / f"{stem}_remapped.safetensors")
    adapters = [a.to_plan() for a in suggestion.adapters]
    text = recipe_toml([(src, key, rules)], target, output, recipe_dir=folder, adapters=adapters)
    with atomic_write(path, overwrite=force) as f:
        f.write(text.encode("utf-8"))


def render_suggestion(s: Suggestion, command: str, *, gated: bool) -> str:
    """The suggestion as text: the command to paste, the TOML block, what stays unresolved.

    ``gated``: the command checks its result against the model (``--model``), allowing what
    stays missing.
    """
    lines: list[str] = []
    if s.rules is not None or s.adapters:
        dropped = s.matched_after == s.matched_before and not s.adapters
        adapted = sum(len(a.keys) for a in s.adapters)
        lines.append(
            f"suggested rules: {s.matched_after} of {s.model_keys} model tensors would match "
            f"(now {s.matched_before}"
            + (f"; {adapted} more through the adapters below" if adapted else "")
            + ("; the rules drop the checkpoint keys the model cannot take)" if dropped else ")")
        )
        lines += ["", "  " + command, ""]
        if s.rule_counts:
            lines.append("each rule, and the checkpoint keys it matches:")
            width = max(len(rule) for rule, _ in s.rule_counts)
            lines += [f"  {rule:<{width}}  {n}" for rule, n in s.rule_counts]
            lines.append("")
        if s.adapters:
            lines.append("adapters (shape mismatches fixed instead of dropped):")
            for a in s.adapters:
                lines.append(f"  {shlex.join(a.args)}  ({len(a.keys)} keys: {a.note})")
            lines.append("")
        if s.rules:
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
