from __future__ import annotations

from pathlib import Path

import click

from ckptsurgery.cli._common import refusals, warnings_as_notes
from ckptsurgery.cli._options import (
    gate_options,
    rule_options,
    source_options,
    write_options,
)
from ckptsurgery.cli._surgery import (
    check_surgery_flags,
    gate_from_flags,
    render,
    write_recipe,
)
from ckptsurgery.render.progress import byte_progress
from ckptsurgery.rules import Rules
from ckptsurgery.surgery import remap


@click.command("remap")
@click.argument("src")
@rule_options
@write_options
@gate_options
@source_options
def remap_cmd(
    src: str,
    out: str | None,
    rules: Rules,
    rules_key: str | None,
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
    """Filter and rename the keys of SRC and write the result to OUT.

    Rules apply in this order: --keep, --drop, --strip-prefix, --replace, --regex,
    --add-prefix. Tensors are copied bit-exactly, or cast with --dtype (integer and bool
    tensors never are; --keep-dtype spares more); OUT is written atomically and SRC is never
    modified. --dry-run prints the plan: every output tensor, its operation and bytes.

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

    \b
    Example (bfloat16, BatchNorm statistics kept in float32, saved as a recipe too):
      ckptsurgery remap resnet50.pth -o resnet50-bf16.safetensors --dtype bfloat16 \\
          --keep-dtype '*.running_*' --emit-recipe resnet50-bf16.toml
    """
    check_surgery_flags(
        out=out,
        dry_run=dry_run,
        emit_recipe=emit_recipe,
        dtype=dtype,
        keep_dtype=keep_dtype,
        inputs=[src],
        force=force,
    )
    gate = gate_from_flags(model_spec, model_args, allow_missing, allow_unexpected, drop_mismatched)
    src_key = key or rules_key
    with (
        refusals(as_json=as_json, fmt=table_fmt, command="remap", source=src, output=out),
        warnings_as_notes(),
        byte_progress(f"writing {Path(out or '').name}", progress) as on_progress,
    ):
        result = remap(
            src,
            out,
            rules,
            key=src_key,
            format=fmt,
            force=force,
            dry_run=dry_run,
            gate=gate,
            allow_globals=allow_globals,
            unsafe_pickle=unsafe_pickle,
            max_shard_size=max_shard_size,
            progress=on_progress,
            verify=not no_verify,
            dtype=dtype,
            keep_dtype=keep_dtype,
        )
    if emit_recipe is not None:
        assert out is not None  # checked above
        write_recipe(
            emit_recipe,
            [(src, src_key, rules)],
            out,
            model_spec=model_spec,
            model_args=model_args,
            gate=gate,
            dtype=dtype,
            keep_dtype=keep_dtype,
            fmt=fmt,
            max_shard_size=max_shard_size,
            force=force,
        )
    s0 = result.plan.sources[0]
    payload = {
        "source": src,
        "key": result.plan.sources[0].key,
        "output": out,
        "rules": rules.to_dict(),
        **s0.keys.to_dict(),
    }
    if result.written is not None:
        payload.update(tensors=result.written.tensors)
    render(
        result,
        given_key=src_key,
        dry_run=dry_run,
        as_json=as_json,
        fmt=table_fmt,
        payload=payload,
    )
