from __future__ import annotations

import click

from ckptsurgery.cli._common import echo_json, note, refusals, warnings_as_notes
from ckptsurgery.cli._options import (
    fmt_option,
    parse_transform,
    required_model_options,
    runtime_options,
    source_options,
    transform_options,
)


@click.command("evaluate")
@required_model_options
@click.option("--weights", metavar="CKPT", required=True, help="Checkpoint to evaluate.")
@click.option(
    "--data",
    metavar="DIR",
    required=True,
    help="DIR/test, else DIR/val, else DIR itself holding the class folders.",
)
@click.option(
    "--head",
    "head_name",
    metavar="NAME",
    default=None,
    help="The classifier head's module (default: fc, classifier, head, heads.head, ...).",
)
@source_options
@transform_options
@click.option("--batch-size", type=int, default=64, show_default=True, help="Batch size.")
@runtime_options
@click.option("--json", "as_json", is_flag=True, help='Print {"loss", "top1", "top5", "samples"}.')
@fmt_option
def evaluate_cmd(
    model_spec: str,
    model_args: tuple[str, ...],
    weights: str,
    data: str,
    head_name: str | None,
    key: str | None,
    allow_globals: tuple[str, ...],
    unsafe_pickle: bool,
    image_size: int,
    channels: str,
    mean: str | None,
    std: str | None,
    batch_size: int,
    device: str,
    amp: str | None,
    threads: int | None,
    workers: int | None,
    as_json: bool,
    fmt: str,
) -> None:
    """Loss and accuracy of a checkpoint on an ImageFolder split.

    The model's head is sized to the data's classes and the checkpoint must fill every key,
    head included (exit 1 with the report otherwise). Top-5 is computed with more than 5
    classes. Use the transform options the model was trained with.

    \b
    Example:
      ckptsurgery evaluate --model torchvision:resnet18 --weights run/best.safetensors \\
          --data digits --image-size 32 --json
    """
    from ckptsurgery.models import parse_model_args
    from ckptsurgery.render.tables import table
    from ckptsurgery.train.evaluation import evaluate

    if batch_size < 1:
        raise click.BadParameter("must be positive", param_hint="--batch-size")
    with (
        refusals(as_json=as_json, fmt=fmt, command="evaluate", weights=weights),
        warnings_as_notes(),
    ):
        result = evaluate(
            model_spec,
            weights,
            data,
            model_args=parse_model_args(model_args),
            head=head_name,
            key=key,
            transform=parse_transform(image_size, channels, mean, std),
            batch_size=batch_size,
            device=device,
            amp=amp,
            threads=threads,
            workers=workers,
            allow_globals=allow_globals,
            unsafe_pickle=unsafe_pickle,
            log=note,
        )
    for line in result.notes:
        note(f"note: {line}")
    m = result.metrics
    if as_json:
        echo_json(m.to_json())
        return
    top5 = "-" if m.top5 is None else f"{m.top5:.4f}"
    rows = [("loss", f"{m.loss:.4f}"), ("top1", f"{m.top1:.4f}"), ("top5", top5)]
    rows.append(("samples", f"{m.samples:,}"))
    click.echo(table(rows, ("metric", "value"), fmt=fmt))
    note(f"evaluated on {result.folder} ({len(result.classes)} classes)")
