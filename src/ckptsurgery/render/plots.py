"""Pictures of a value diff and of a training run's curves; the only module that imports
matplotlib (the ``plot`` extra).

matplotlib is imported when a picture is drawn, never when a command starts, and without
pyplot: a :class:`~matplotlib.figure.Figure` rendered by the Agg canvas holds no global state
and needs no display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ckptsurgery.errors import OutputError
from ckptsurgery.io.atomic import atomic_write

if TYPE_CHECKING:
    from ckptsurgery._types import PathLike

__all__ = ["MissingPlotExtra", "plot_blocks", "plot_curves", "require_matplotlib"]


class _Block(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def rel_l2(self) -> float: ...
    @property
    def bit_equal(self) -> int: ...
    @property
    def tensors(self) -> int: ...


class _Diff(Protocol):
    """What a picture needs of a value diff (:class:`ckptsurgery.valuediff.ValueDiff`), which
    sits above the renderers: they take its shape, not its import."""

    @property
    def a(self) -> str: ...
    @property
    def b(self) -> str: ...
    @property
    def blocks(self) -> Sequence[_Block]: ...


class MissingPlotExtra(OutputError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise :class:`MissingPlotExtra` unless matplotlib can be imported (it then is)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingPlotExtra(
            "--plot needs matplotlib, which is not installed: "
            "pip install 'ckptsurgery[plot]' (or matplotlib>=3.7)"
        ) from None


def plot_blocks(diff: _Diff, path: PathLike, *, overwrite: bool = False) -> None:
    """A PNG (SVG, PDF: by the name's extension) bar chart of the relative L2 change (‖a-b‖ / ‖b‖) of every block, in model order,
    on a log scale. Blocks without change are drawn at the axis' floor in another colour
    and labelled "= (bit-equal)" or "= (no change)"."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    blocks = list(diff.blocks)
    values = [b.rel_l2 for b in blocks]
    changed = [v for v in values if v > 0 and math.isfinite(v)]
    floor = min(changed) / 10 if changed else 1e-12
    top = max(changed) * 10 if changed else 1.0
    heights = [v if v > 0 and math.isfinite(v) else (top if v > 0 else floor) for v in values]
    colors = ["tab:blue" if v > 0 and math.isfinite(v) else "tab:red" if v > 0 else "tab:gray"
              for v in values]  # fmt: skip

    width = min(40.0, max(6.0, 0.28 * len(blocks) + 2))
    fig = Figure(figsize=(width, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = range(len(blocks))
    ax.bar(xs, heights, color=colors)
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, top)
    ax.set_xticks(list(xs), [b.name for b in blocks], rotation=90, fontsize=7)
    ax.set_ylabel("relative L2 change  ‖a-b‖ / ‖b‖")
    ax.set_title(f"{diff.a} vs {diff.b}: relative change per block", fontsize=9)
    ax.grid(axis="y", which="major", alpha=0.3)
    for x, b, v in zip(xs, blocks, values, strict=True):
        if v == 0:
            label = "= (bit-equal)" if b.bit_equal == b.tensors else "= (no change)"
            ax.text(x, floor, label, rotation=90, fontsize=6, ha="center", va="bottom")
    # PNG unless the name asks for one of the other formats Agg writes without extra libraries
    suffix = Path(path).suffix.lower().lstrip(".")
    with atomic_write(path, overwrite=overwrite) as f:
        fig.savefig(f, format=suffix if suffix in ("svg", "pdf") else "png", dpi=100)


def plot_curves(metrics: Sequence[dict[str, Any]], path: PathLike) -> None:
    """A training run's curves (``curves.png``) from its ``metrics.jsonl`` records, per epoch:
    the training and validation loss, top-1 (top-5, the EMA's when recorded) and each
    parameter group's lr at the epoch's start. PNG (SVG, PDF by the name's extension)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in metrics]
    fig = Figure(figsize=(15, 4), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    loss_ax.plot(epochs, [r["train_loss"] for r in metrics], marker="o", label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in metrics], marker="o", label="val")
    acc_ax.plot(epochs, [r["top1"] for r in metrics], marker="o", label="top1")
    if any(r.get("top5") is not None for r in metrics):
        acc_ax.plot(epochs, [r.get("top5") for r in metrics], marker="o", label="top5")
    if any("ema" in r for r in metrics):
        ema = [r.get("ema") or {} for r in metrics]
        loss_ax.plot(epochs, [e.get("val_loss") for e in ema], marker="s", label="val (EMA)")
        acc_ax.plot(epochs, [e.get("top1") for e in ema], marker="s", label="top1 (EMA)")
    for group in dict.fromkeys(g for r in metrics for g in r.get("lr", {})):
        lr_ax.plot(epochs, [r.get("lr", {}).get(group) for r in metrics], marker="o", label=group)
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy"), (lr_ax, "lr (epoch start)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    suffix = Path(path).suffix.lower().lstrip(".")
    with atomic_write(path) as f:
        fig.savefig(f, format=suffix if suffix in ("svg", "pdf") else "png", dpi=100)
