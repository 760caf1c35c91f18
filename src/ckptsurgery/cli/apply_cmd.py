from __future__ import annotations

import click

from ckptsurgery.cli._common import note, refusals, warnings_as_notes
from ckptsurgery.cli._options import (
    max_shard_size_option,
    progress_option,
    source_options,
    table_fmt_option,
    verify_option,
)
from ckptsurgery.cli._surgery import render
from ckptsurgery.recipe import apply_recipe
from ckptsurgery.render.progress import byte_progress


@click.command("apply")
@click.argument("recipe", metavar="RECIPE.toml")
@click.option("--force", is_flag=True, help="Replace the recipe's output if it exists.")
@max_shard_size_option
@verify_option
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print every source's plan, the merge and the gate report; write nothing.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@table_fmt_option
@progress_option
@source_options
def apply_cmd(
    recipe: str,
    force: bool,
    max_shard_size: str | None,
    no_verify: bool,
    dry_run: bool,
    as_json: bool,
    table_fmt: str,
    progress: bool | None,
    key: str | None,
    allow_globals: tuple[str, ...],
    unsafe_pickle: bool,
) -> None:
    """Run a whole surgery written down in a TOML recipe.

    A recipe lists one or more [[source]] blocks (path, key and the rules of `remap`: keep,
    drop, strip_prefix, replace, regex, add_prefix), an optional [merge] (on_conflict,
    average, weights), an optional [target] gate (model, model_args, allow_missing,
    allow_unexpected, drop_mismatched), the [output] path (and format, or max_shard_size
    for a folder of safetensors shards, which --max-shard-size overrides) and optional
    [[adapt]] shape adapters (op = "rows", "in-chans" or "resample-pos-embed", key, and the
    op's fields, as remap's --rows, --in-chans and --resample-pos-embed). Paths are
    relative to the recipe's folder. --key is used for sources that give no key; trusting pickles
    (--allow-global, --unsafe-pickle) is only ever said on the command line.

    \b
    Example (a MoCo backbone plus a separately trained head, gated against the model):
      ckptsurgery apply moco_resnet50.toml --dry-run
    \b
    where moco_resnet50.toml holds:
      [[source]]
      path = "moco_v2.pth.tar"
      keep = ["module.encoder_q.*"]
      drop = ["module.encoder_q.fc.*"]
      strip_prefix = ["module.encoder_q."]
      [[source]]
      path = "head.safetensors"
      [target]
      model = "torchvision:resnet50"
      [output]
      path = "resnet50_moco.safetensors"
    """
    with (
        refusals(as_json=as_json, fmt=table_fmt, command="apply", recipe=recipe),
        warnings_as_notes(),
        byte_progress("writing", progress) as on_progress,
    ):
        done = apply_recipe(
            recipe,
            dry_run=dry_run,
            force=force,
            key=key,
            allow_globals=allow_globals,
            unsafe_pickle=unsafe_pickle,
            verify=not no_verify,
            max_shard_size=max_shard_size,
            progress=on_progress,
        )
    if done.model_note:
        note(f"note: {done.model_note}")
    render(
        done.result,
        given_key=key,
        dry_run=dry_run,
        as_json=as_json,
        fmt=table_fmt,
        plans=True,
        payload={"recipe": recipe},
    )
