from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from ckptsurgery.cli._adapters import adapter_options
from ckptsurgery.cli._options import (
    GateFlags,
    WriteFlags,
    gate_options,
    source_options,
    write_options,
)
from ckptsurgery.cli._surgery import surgery_command, target_of
from ckptsurgery.merge import average_files, merge_files, method_merge_files
from ckptsurgery.plan.lora import LoraAdapter
from ckptsurgery.rules import Rules

if TYPE_CHECKING:
    from ckptsurgery.plan.adapt import Adapter
    from ckptsurgery.plan.run import SurgeryResult

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
    "e.g. --weights 0.5 0.3 0.2 or --weights 0.5,0.3,0.2. With --method: one weight per "
    "model after the base (default 1 each; not normalised; may be negative).",
)
@click.option(
    "--method",
    type=click.Choice(["task-arithmetic", "ties", "dare-linear", "dare-ties"]),
    default=None,
    help="Merge the fine-tunes SRC... into --base by their task vectors (SRC minus BASE), "
    "as mergekit does: task-arithmetic (weighted sum), ties (trim to the top --density by "
    "magnitude, elect each entry's sign by summed mass, disjoint mean), dare-linear / "
    "dare-ties (drop entries with probability 1 - density, rescale by 1/density; then sum, "
    "or elect signs as ties).",
)
@click.option("--base", metavar="BASE", default=None, help="With --method: the base model.")
@click.option(
    "--density",
    type=float,
    default=None,
    help="With --method ties|dare-linear|dare-ties (required): the fraction of each task "
    "vector kept, in (0, 1].",
)
@click.option(
    "--lambda",
    "lambda_",
    type=float,
    default=None,
    help="With --method: scale the merged task vector before adding it to the base (default 1).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=None,
    help="With --method dare-linear|dare-ties: the seed of the random drop (default 0); each "
    "tensor draws from its own generator seeded from (seed, key), so a run is reproducible.",
)
@click.option(
    "--normalize/--no-normalize",
    default=None,
    help="With --method: divide the merged task vector by the weights that took part "
    "(default: on for ties, off for the others, as in mergekit).",
)
@click.option(
    "--lora",
    "lora_path",
    metavar="ADAPTER_DIR",
    default=None,
    help="Fold this peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors "
    "or .bin) into the result: W + scale * B @ A per target, in float32, stored in the base's "
    "dtype (or --dtype); its modules_to_save copies replace the base's tensors.",
)
@adapter_options
@gate_options
@source_options
def merge_cmd(
    sources: tuple[str, ...],
    write: WriteFlags,
    on_conflict: str | None,
    average: bool,
    weights_text: tuple[str, ...],
    method: str | None,
    base: str | None,
    density: float | None,
    lambda_: float | None,
    seed: int | None,
    normalize: bool | None,
    lora_path: str | None,
    adapters: tuple[Adapter, ...],
    gate_flags: GateFlags,
    key: str | None,
    allow_globals: tuple[str, ...],
    unsafe_pickle: bool,
) -> None:
    """Merge checkpoints: the union of their keys, with --average their elementwise mean, or
    with --method fine-tunes merged into their --base (task arithmetic, TIES, DARE).

    Union: a key found in several sources is an error unless --on-conflict first|last says
    which source it comes from. Tensors are copied bit-exactly.

    --average: every source needs the same keys and shapes. Floating tensors are averaged in
    float32 or wider and stored in the source dtype; integer and bool tensors (e.g.
    num_batches_tracked) are taken from the first source. Tensors are read one at a time.

    --key applies to every source (use a recipe, `ckptsurgery apply`, for per-source keys and
    rules). A safetensors OUT records where every tensor came from (see `inspect`).

    --method: SRC... are fine-tunes of --base, with the base's keys and shapes. Each tensor
    is computed in float32 (float64 if an input is) from the task vectors SRC - BASE and
    stored in the base's dtype (or --dtype); integer and bool tensors are the base's. The
    definitions follow mergekit's; see the README for where they differ.

    --lora ADAPTER_DIR folds a peft LoRA adapter into the base (the one SRC, or the union):
    one base tensor and its adapter pair in memory at a time, no model code needed. DoRA and
    other PEFT methods are refused.

    \b
    Example:
      ckptsurgery merge backbone.safetensors head.safetensors -o model.safetensors
      ckptsurgery merge run1.pt run2.pt run3.pt --average --weights 0.5 0.3 0.2 \\
          -o soup.safetensors
      ckptsurgery merge backbone.safetensors head.safetensors -o model/ --max-shard-size 5GB
      ckptsurgery merge --method ties --base base.safetensors a.safetensors b.safetensors \\
          --density 0.5 --weights 1 0.5 -o merged.safetensors
      ckptsurgery merge base/model.safetensors --lora my-lora/ -o merged.safetensors
    """
    weights = parse_weights(weights_text)
    _check_method_flags(method, base, average, on_conflict, density, lambda_, seed, normalize)
    if weights is not None and not average and method is None:
        raise click.UsageError("--weights needs --average or --method")
    if average and on_conflict is not None:
        raise click.UsageError("--on-conflict does not apply with --average")
    if lora_path is not None and (average or method is not None):
        what = "--average" if average else "--method"
        raise click.UsageError(f"--lora does not apply with {what} (fold into one base)")
    lora = (LoraAdapter(lora_path),) if lora_path is not None else ()
    target = target_of(gate_flags)
    provenance = {"target": target.to_dict()} if target is not None else {}
    trust = {"allow_globals": allow_globals, "unsafe_pickle": unsafe_pickle}

    method_params: dict[str, Any] = {
        "weights": weights,
        "density": density,
        "lambda_": 1.0 if lambda_ is None else lambda_,
        "seed": seed,
        "normalize": normalize,
    }

    def run(**options: Any) -> SurgeryResult:
        common = {"key": key, "provenance": provenance, **trust, **options}
        if lora:
            common["lora"] = lora[0]
        if method is not None:
            assert base is not None  # checked above
            return method_merge_files(
                base, list(sources), write.out, method=method, **method_params, **common
            )
        if average:
            return average_files(list(sources), write.out, weights=weights, **common)
        return merge_files(list(sources), write.out, on_conflict=on_conflict or "error", **common)

    everything = [base, *sources] if base is not None else list(sources)
    recipe: dict[str, Any] = {
        "on_conflict": on_conflict or "error",
        "average": average,
        "weights": weights or (),
    }
    if lora:
        recipe["lora"] = lora
    if method is not None:
        given = {"density": density, "lambda_": lambda_, "seed": seed, "normalize": normalize}
        recipe["method"] = {
            "method": method,
            "base": base,
            **{k: v for k, v in given.items() if v is not None},
        }
    surgery_command(
        "merge",
        write,
        gate_flags,
        sources=[(src, key, Rules()) for src in everything],
        run=run,
        given_key=key,
        recipe=recipe,
        adapters=adapters,
    )


def _check_method_flags(
    method: str | None,
    base: str | None,
    average: bool,
    on_conflict: str | None,
    density: float | None,
    lambda_: float | None,
    seed: int | None,
    normalize: bool | None,
) -> None:
    """The flags of --method: each needs it (and it needs --base), none mixes with
    --average or --on-conflict."""
    if method is None:
        given = [
            flag
            for flag, value in (
                ("--base", base),
                ("--density", density),
                ("--lambda", lambda_),
                ("--seed", seed),
                ("--normalize/--no-normalize", normalize),
            )
            if value is not None
        ]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            raise click.UsageError(f"{', '.join(given)} {verb} --method")
        return
    if base is None:
        raise click.UsageError(
            "--method needs --base BASE: the model the SRC... were fine-tuned from"
        )
    if average:
        raise click.UsageError("--method and --average are two ways to merge; give one")
    if on_conflict is not None:
        raise click.UsageError("--on-conflict does not apply with --method")
