from __future__ import annotations

import os
from typing import Any

import click

from ckptsurgery.cli._common import echo_json, note, warnings_as_notes
from ckptsurgery.cli._options import (
    allow_options,
    fmt_option,
    parse_transform,
    required_model_options,
    rule_options,
    runtime_options,
    source_options,
    transform_options,
)
from ckptsurgery.errors import IncompatibleCheckpoint
from ckptsurgery.plan.gate import refusal
from ckptsurgery.render.progress import step_progress
from ckptsurgery.rules import Rules


@click.command("train")
@required_model_options
@click.option(
    "--weights", metavar="CKPT", default=None, help="Checkpoint to start from (default: scratch)."
)
@click.option("--data", metavar="DIR", required=True, help="ImageFolder tree: DIR/train, DIR/val.")
@click.option(
    "-o",
    "--output",
    "out",
    metavar="OUTDIR",
    default=None,
    help="Output folder (created); only --dry-run may omit it.",
)
@click.option(
    "--mode",
    type=click.Choice(["linear-probe", "full", "discriminative"]),
    required=True,
    help="What trains: the head only, everything at --lr, or the head at --lr x --head-lr-mult.",
)
@click.option(
    "--head",
    "head_name",
    metavar="NAME",
    default=None,
    help="The classifier head's module (default: fc, classifier, head, heads.head, ...).",
)
@rule_options
@allow_options
@source_options
@click.option(
    "--optimizer",
    type=click.Choice(["sgd", "adamw"]),
    default="sgd",
    show_default=True,
    help="SGD with --momentum, or AdamW.",
)
@click.option("--lr", type=float, default=0.01, show_default=True, help="Learning rate.")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum.")
@click.option(
    "--head-lr-mult",
    type=float,
    default=10.0,
    show_default=True,
    help="discriminative: the head's lr is --lr times this.",
)
@click.option(
    "--weight-decay",
    type=float,
    default=1e-3,
    show_default=True,
    help="Weight decay of every group (on every parameter, as d2l).",
)
@click.option(
    "--decay-norm-bias/--no-decay-norm-bias",
    default=True,
    show_default=True,
    help="--no-decay-norm-bias: no weight decay on normalisation layers and biases (timm, "
    "MAE); each group gets a '<group>.no_decay' twin at the same lr.",
)
@click.option(
    "--layer-decay",
    type=float,
    default=None,
    help="Layer-wise lr decay (ResNet stages, ViT blocks): depth k trains at lr x D^(L+1-k).",
)
@click.option("--epochs", type=int, default=10, show_default=True, help="Training epochs.")
@click.option(
    "--batch-size",
    type=int,
    default=32,
    show_default=True,
    help="Batch size (per process under torchrun).",
)
@click.option(
    "--scheduler",
    type=click.Choice(["none", "step", "cosine"]),
    default="cosine",
    show_default=True,
    help="lr schedule, stepped every batch; the same factor on every group.",
)
@click.option(
    "--warmup-epochs",
    type=int,
    default=0,
    show_default=True,
    help="Linear warmup over this many epochs.",
)
@click.option(
    "--min-lr-ratio",
    type=float,
    default=0.0,
    show_default=True,
    help="cosine: the floor, as a fraction of each group's lr.",
)
@click.option(
    "--step-size",
    type=int,
    default=None,
    help="step: decay every this many epochs (default: a third of them).",
)
@click.option("--gamma", type=float, default=0.1, show_default=True, help="step: the decay factor.")
@click.option(
    "--early-stop",
    type=int,
    default=None,
    metavar="PATIENCE",
    help="Stop after this many epochs without a better top-1.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option(
    "--clip-grad",
    type=float,
    default=None,
    metavar="NORM",
    help="Clip the gradients' global L2 norm to NORM before each optimizer step.",
)
@click.option(
    "--accum-steps",
    type=int,
    default=1,
    show_default=True,
    metavar="N",
    help="Accumulate the gradients of N batches per optimizer step (and scheduler step).",
)
@click.option(
    "--label-smoothing",
    type=float,
    default=0.0,
    show_default=True,
    help="Label smoothing of the cross-entropy (and of mixed targets).",
)
@click.option(
    "--mixup",
    type=float,
    default=0.0,
    show_default=True,
    metavar="ALPHA",
    help="Mixup with lam ~ Beta(ALPHA, ALPHA) (0: off); soft-target cross-entropy.",
)
@click.option(
    "--cutmix",
    type=float,
    default=0.0,
    show_default=True,
    metavar="ALPHA",
    help="CutMix with lam ~ Beta(ALPHA, ALPHA) (0: off).",
)
@click.option(
    "--mix-prob",
    type=float,
    default=1.0,
    show_default=True,
    help="The chance that a batch is mixed (mixup / cutmix).",
)
@click.option(
    "--mix-switch-prob",
    type=float,
    default=0.5,
    show_default=True,
    help="With both --mixup and --cutmix: the chance of cutmix.",
)
@click.option(
    "--ema",
    type=float,
    default=None,
    metavar="DECAY",
    help="Keep an EMA of the weights (timm ModelEmaV3), evaluated each epoch, in ema.safetensors.",
)
@click.option(
    "--ema-warmup/--no-ema-warmup",
    default=True,
    show_default=True,
    help="Warm the EMA's decay up as ModelEmaV3 (1 - (1 + step)^-2/3, up to DECAY).",
)
@click.option(
    "--keep-top-k",
    type=int,
    default=None,
    metavar="K",
    help="Keep the K best checkpoints by top-1 (then val loss) in OUTDIR/top_k/.",
)
@click.option(
    "--average-top-k",
    is_flag=True,
    help="Average the kept checkpoints into averaged.safetensors and evaluate it.",
)
@transform_options
@click.option(
    "--augment/--no-augment",
    default=False,
    show_default=True,
    help="Training augmentation: RandomResizedCrop (scale 0.5-1) and horizontal flips.",
)
@click.option(
    "--bn",
    type=click.Choice(["eval", "recalibrate"]),
    default="eval",
    show_default=True,
    help="recalibrate: re-estimate BatchNorm statistics on the training data before each "
    "evaluation (full / discriminative).",
)
@runtime_options
@click.option("--channels-last", is_flag=True, help="Channels-last memory format (conv nets).")
@click.option(
    "--compile", is_flag=True, help="torch.compile the training forward (saved keys unchanged)."
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="A progress bar (default: on a terminal only; otherwise one line per epoch).",
)
@click.option("--resume", is_flag=True, help="Continue the run in OUTDIR from its last epoch.")
@click.option("--force", is_flag=True, help="Replace an earlier run's files in OUTDIR.")
@click.option("--dry-run", is_flag=True, help="Print the loading report and the group table; stop.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@fmt_option
def train_cmd(
    model_spec: str,
    model_args: tuple[str, ...],
    weights: str | None,
    data: str,
    out: str | None,
    mode: str,
    head_name: str | None,
    rules: Rules,
    rules_key: str | None,
    allow_missing: tuple[str, ...],
    allow_unexpected: tuple[str, ...],
    key: str | None,
    allow_globals: tuple[str, ...],
    unsafe_pickle: bool,
    image_size: int,
    channels: str,
    mean: str | None,
    std: str | None,
    augment: bool,
    as_json: bool,
    fmt: str,
    **options: Any,
) -> None:
    """Fine-tune a model on an ImageFolder tree (DIR/train, DIR/val or DIR/test).

    The classifier head (found by name, printed; --head overrides) is replaced for the data's
    classes. --weights are loaded through the rules and the gate of `remap --model`: only the
    head may be missing (head keys of the wrong shape are dropped), the report is printed,
    and anything else that does not fit stops the run (exit 1). Before step 1 the parameter
    groups are checked and printed.

    OUTDIR gets last.safetensors and best.safetensors (the model's naming, head included,
    checked to load strictly), last_state.pt (for --resume), config.json and metrics.jsonl;
    ema.safetensors with --ema, top_k/ with --keep-top-k, averaged.safetensors with
    --average-top-k, curves.png when matplotlib is installed (again: ckptsurgery plot OUTDIR).
    timm's recipe: --ema, --clip-grad, --accum-steps, --label-smoothing, --mixup, --cutmix,
    --amp bf16, --channels-last, --compile (the README maps them to timm's train.py).
    In linear-probe mode every frozen tensor is checked to be bit-identical at the end.

    The loss is the batch mean: a recipe with a summed loss (d2l: lr 5e-5, batch 128) takes
    the same SGD steps with --lr 5e-5*128 and --weight-decay divided by 128.

    Under torchrun each process trains on its share of the data with DistributedDataParallel
    (gloo on the CPU, nccl on GPUs; --batch-size is per process); evaluation counts every
    sample once; rank 0 prints and writes OUTDIR.

    \b
    Example (a linear probe of a MoCo backbone; from scratch; from scratch on 2 processes):
      ckptsurgery train --model torchvision:resnet50 --data imagenette -o probe \\
          --weights moco_v2.pth.tar --keep 'module.encoder_q.*' \\
          --drop 'module.encoder_q.fc.*' --strip-prefix module.encoder_q. \\
          --mode linear-probe --lr 0.1 --epochs 20 --dry-run
      ckptsurgery train --model torchvision:resnet50 --data imagenette -o scratch --mode full
      torchrun --standalone --nproc_per_node=2 -m ckptsurgery train \\
          --model torchvision:resnet50 --data imagenette -o ddp --mode full
    """
    from ckptsurgery.models import parse_model_args
    from ckptsurgery.train import TrainConfig, train
    from ckptsurgery.train.loop import TrainResult

    if out is None and not options["dry_run"]:
        raise click.UsageError("Missing option '-o' / '--output' (only --dry-run may omit it).")
    config = TrainConfig(
        model=model_spec,
        model_args=parse_model_args(model_args),
        data=data,
        out=out or "",
        mode=mode,  # type: ignore[arg-type]  # click.Choice checked it
        weights=weights,
        key=key or rules_key,
        rules=rules,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        allow_globals=allow_globals,
        unsafe_pickle=unsafe_pickle,
        head=head_name,
        transform=parse_transform(image_size, channels, mean, std, augment),
        **options,
    )
    try:
        with warnings_as_notes(), step_progress(config.progress) as on_step:
            # With --json, stdout holds the JSON object only; the tables go to stderr.
            show = note if as_json else click.echo
            result: TrainResult = train(config, log=note, show=show, fmt=fmt, on_step=on_step)
    except IncompatibleCheckpoint as e:
        # Under torchrun every process refuses the same weights; rank 0 shows the report.
        r = refusal(e, command="train", weights=weights)
        if os.environ.get("RANK", "0") == "0":
            if as_json:
                echo_json(r.to_json())
            else:
                click.echo(r.text(fmt=fmt))
        note(r.error_line())
        raise click.exceptions.Exit(r.exit_code) from None

    if result.rank != 0:  # under torchrun, rank 0 prints for every process
        return
    if as_json:
        echo_json(
            {
                "output": str(result.out) if result.out else None,
                "dry_run": result.dry_run,
                "head": result.head.name,
                "classes": list(result.classes),
                "groups": result.groups,
                "report": result.report.to_json() if result.report else None,
                "plan": result.plan.to_json() if result.plan else None,
                "world_size": result.world_size,
                "best_epoch": result.best_epoch,
                "best": result.best,
                "stopped_early": result.stopped_early,
                "averaged": result.averaged,
                "metrics": result.metrics,
            }
        )
        return
    if result.dry_run:
        return
    click.echo(epochs_table(result.metrics, fmt=fmt))
    best = result.best
    if best is not None:
        note(
            f"best: epoch {best['epoch']}, top1 {best['top1']:.4f}, val loss "
            f"{best['val_loss']:.4f}; wrote {result.out}/best.safetensors, last.safetensors, "
            "last_state.pt, config.json, metrics.jsonl"
        )
    if result.metrics and ("ema" in result.metrics[-1] or result.averaged):
        click.echo(weights_table(result, fmt=fmt))


def weights_table(result: Any, *, fmt: str = "simple") -> str:
    """The final weights side by side: raw (last and best epoch), EMA, averaged."""
    from ckptsurgery.render.tables import table

    def row(name: str, m: dict[str, Any], file: str) -> tuple[str, str, str, str, str]:
        top5 = "-" if m.get("top5") is None else f"{m['top5']:.4f}"
        return (name, f"{m['top1']:.4f}", top5, f"{m['val_loss']:.4f}", file)

    last, best = result.metrics[-1], result.best
    rows = [row(f"raw, last (epoch {last['epoch']})", last, "last.safetensors")]
    if best is not None:
        rows.append(row(f"raw, best (epoch {best['epoch']})", best, "best.safetensors"))
    if "ema" in last:
        rows.append(row(f"EMA (epoch {last['epoch']})", last["ema"], "ema.safetensors"))
    if result.averaged:
        epochs = ",".join(map(str, result.averaged["epochs"]))
        rows.append(row(f"averaged (epochs {epochs})", result.averaged, "averaged.safetensors"))
    return table(rows, ("weights", "top1", "top5", "val loss", "file"), fmt=fmt)


def epochs_table(metrics: list[dict[str, Any]], *, fmt: str = "simple") -> str:
    from ckptsurgery.render.tables import table

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    rows = [
        (
            m["epoch"],
            num(m["train_loss"]),
            num(m["val_loss"]),
            num(m["top1"]),
            num(m["top5"]),
            f"{m['seconds']:.1f}",
            "*" if m["best"] else "",
        )
        for m in metrics
    ]
    return table(
        rows, ("epoch", "train loss", "val loss", "top1", "top5", "seconds", "best"), fmt=fmt
    )
