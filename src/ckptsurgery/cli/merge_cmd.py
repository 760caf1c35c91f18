from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ckptsurgery.cli._common import refusals, warnings_as_notes
from ckptsurgery.cli._options import (
    gate_options,
    source_options,
    write_options,
)
from ckptsurgery.cli._surgery import (
    check_surgery_flags,
    gate_from_flags,
    render,
    write_recipe,
)
from ckptsurgery.merge import average_files, merge_files
from ckptsurgery.models import parse_model_args
from ckptsurgery.render.progress import byte_progress
from ckptsurgery.rules import Rules

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
@write_options
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
@gate_options
@source_options
def merge_cmd(
    sources: tuple[str, ...],
    out: str | None,
    on_conflict: str | None,
    average: bool,
    weights_text: tuple[str, ...],
    fmt: str | None,
    dtype: str | None,
    keep_dtype: tuple[str, ...],
    max_shard_size: str | None,
    progress: bool | None,
    force: bool,
    no_verify: bool,
    dry_run: bool,
    as_json: bool,
    table_fmt: str,
    emit_recipe: str | None,
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
    weights = parse_weights(weights_text)
    if weights is not None and not average:
        raise click.UsageError("--weights needs --average")
    if average and on_conflict is not None:
        raise click.UsageError("--on-conflict does not apply with --average")
    check_surgery_flags(
        out=out,
        dry_run=dry_run,
        emit_recipe=emit_recipe,
        dtype=dtype,
        keep_dtype=keep_dtype,
        inputs=list(sources),
        force=force,
    )
    gate = gate_from_flags(model_spec, model_args, allow_missing, allow_unexpected, drop_mismatched)
    provenance: dict[str, Any] = {}
    if gate is not None:
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
        "dtype": dtype,
        "keep_dtype": keep_dtype,
    }
    with (
        refusals(
            as_json=as_json, fmt=table_fmt, command="merge", sources=list(sources), output=out
        ),
        warnings_as_notes(),
        byte_progress(f"writing {Path(out or '').name}", progress) as on_progress,
    ):
        if average:
            result = average_files(
                list(sources), out, weights=weights, progress=on_progress, **common
            )
        else:
            result = merge_files(
                list(sources),
                out,
                on_conflict=on_conflict or "error",
                progress=on_progress,
                **common,
            )
    if emit_recipe is not None:
        assert out is not None  # checked above
        write_recipe(
            emit_recipe,
            [(src, key, Rules()) for src in sources],
            out,
            model_spec=model_spec,
            model_args=model_args,
            gate=gate,
            on_conflict=on_conflict or "error",
            average=average,
            weights=weights or (),
            dtype=dtype,
            keep_dtype=keep_dtype,
            fmt=fmt,
            max_shard_size=max_shard_size,
            force=force,
        )
    render(result, given_key=key, dry_run=dry_run, as_json=as_json, fmt=table_fmt)
