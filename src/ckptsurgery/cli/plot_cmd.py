from __future__ import annotations

from pathlib import Path

import click

from ckptsurgery.cli._common import note


@click.command("plot")
@click.argument("outdir", metavar="OUTDIR", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "target",
    metavar="PNG",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to draw (default: OUTDIR/curves.png).",
)
def plot_cmd(outdir: Path, target: Path | None) -> None:
    """Draw a training run's curves from OUTDIR/metrics.jsonl: loss, accuracy and each
    parameter group's lr per epoch (EMA and top-5 too when recorded). Needs matplotlib
    (the plot extra).

    \b
    Example:
      ckptsurgery plot run            # writes run/curves.png
    """
    from ckptsurgery.render.plots import plot_curves
    from ckptsurgery.train.errors import TrainError
    from ckptsurgery.train.outputs import read_metrics

    metrics_path = outdir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise TrainError(f"{str(outdir)!r} holds no metrics.jsonl: is it a training run's OUTDIR?")
    try:
        metrics = read_metrics(metrics_path)
    except (ValueError, KeyError) as e:
        raise TrainError(
            f"{metrics_path} is not a metrics.jsonl of ckptsurgery train: {e}"
        ) from None
    if not metrics:
        raise TrainError(f"{metrics_path} holds no epoch yet: nothing to plot")
    path = target or outdir / "curves.png"
    plot_curves(metrics, path)
    note(f"wrote {path}")
