"""``diff --values``: the value diff of two checkpoints (:func:`ckptsurgery.compare.compare`),
its options and its rendering; ``diff`` hands over to :func:`run_values` when asked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ckptsurgery.cli._common import echo_json, note, refusals, warnings_as_notes
from ckptsurgery.cli._options import _folded

if TYPE_CHECKING:
    from collections.abc import Callable

    from ckptsurgery.rules import Rules
    from ckptsurgery.valuediff import TensorDiff

F = TypeVar("F", bound="Callable[..., Any]")

# compare.STATS, torch-free and without importing compare when the CLI starts
SORT_STATS = ("max_abs", "rel_l2", "cosine", "nan", "inf", "numel", "outside")


@dataclass(frozen=True)
class ValueFlags:
    """The value-diff options of ``diff``, as the command received them."""

    values: bool
    atol: float | None
    rtol: float | None
    bit_equal: bool
    equal_nan: bool
    sort: str | None
    top: int | None
    depth: int | None
    plot: str | None

    @property
    def wanted(self) -> bool:
        """Any value option given: each implies ``--values``."""
        return (
            self.values
            or self.bit_equal
            or self.equal_nan
            or self.atol is not None
            or self.rtol is not None
            or self.sort is not None
            or self.top is not None
            or self.depth is not None
            or self.plot is not None
        )


def value_options(f: F) -> F:
    """``--values`` and what goes with it, handed over as ``values`` (:class:`ValueFlags`)."""
    f = _folded("values", ValueFlags)(f)
    opts = [
        click.option(
            "--values",
            is_flag=True,
            help="Compare the tensors' values with REF's (one pair in memory at a time): max "
            "|a-b|, relative L2 ‖a-b‖/‖b‖, cosine, bit-equal, NaN/Inf counts, per tensor, per "
            "block and overall. Reports only (exit 0) unless --atol/--rtol/--bit-equal.",
        ),
        click.option(
            "--atol",
            type=click.FloatRange(min=0),
            default=None,
            metavar="X",
            help="Check |a-b| <= atol + rtol*|b| elementwise (torch.testing.assert_close's "
            "rule; rtol 0 unless given): exit 1 when a tensor is outside. Implies --values.",
        ),
        click.option(
            "--rtol",
            type=click.FloatRange(min=0),
            default=None,
            metavar="Y",
            help="Relative tolerance of that check (atol 0 unless given). Implies --values.",
        ),
        click.option(
            "--bit-equal",
            is_flag=True,
            help="Check that every tensor is bit-equal (dtype, shape, bytes): exit 1 when one "
            "is not. Implies --values.",
        ),
        click.option(
            "--equal-nan",
            is_flag=True,
            help="With --atol/--rtol: NaN in both at one position counts as close.",
        ),
        click.option(
            "--sort",
            type=click.Choice(SORT_STATS),
            default=None,
            help="Order the tensors by a statistic, worst first (cosine: lowest first); "
            "default: the checkpoint's order.",
        ),
        click.option(
            "--top",
            type=click.IntRange(min=1),
            default=None,
            metavar="N",
            help="Show only the first N tensors (after --sort).",
        ),
        click.option(
            "--depth",
            type=click.IntRange(min=1),
            default=None,
            metavar="N",
            help="Blocks are the keys' first N dotted parts (as inspect --depth N); default: "
            "up to the first number (blocks.3, layer1.0), else the module.",
        ),
        click.option(
            "--plot",
            metavar="FILE.png",
            default=None,
            help="Draw the relative change per block (bar chart, log scale) to a PNG (.svg, "
            ".pdf: those formats); needs the plot extra (matplotlib). --force replaces an "
            "existing FILE.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def run_values(
    src: str,
    ref: str,
    flags: ValueFlags,
    *,
    key: str | None,
    ref_key: str | None,
    rules: Rules | None = None,
    allow_missing: tuple[str, ...],
    allow_unexpected: tuple[str, ...],
    as_json: bool,
    fmt: str,
    force: bool,
    allow_globals: tuple[str, ...],
    unsafe_pickle: bool,
) -> None:
    """Compare, render, plot, and exit 1 when a check fails (naming the worst tensors)."""
    from ckptsurgery.compare import compare
    from ckptsurgery.io import check_output_path
    from ckptsurgery.render.progress import byte_progress
    from ckptsurgery.render.tables import count

    with (
        refusals(as_json=as_json, fmt=fmt, command="diff", source=src),
        warnings_as_notes(),
    ):
        if flags.plot is not None:
            # refuse before any work rather than after it
            check_output_path(flags.plot, inputs=[src, ref], force=force)
            from ckptsurgery.render.plots import require_matplotlib

            require_matplotlib()
        with byte_progress("comparing", None) as on_progress:
            result = compare(
                src,
                ref,
                key=key,
                b_key=ref_key,
                rules=rules,
                atol=flags.atol,
                rtol=flags.rtol,
                bit_equal=flags.bit_equal,
                equal_nan=flags.equal_nan,
                allow_missing=allow_missing,
                allow_unexpected=allow_unexpected,
                depth=flags.depth,
                allow_globals=allow_globals,
                unsafe_pickle=unsafe_pickle,
                progress=on_progress,
            )
        if flags.plot is not None:
            from ckptsurgery.render.plots import plot_blocks

            plot_blocks(result, flags.plot, overwrite=force)
            note(f"wrote the plot to {flags.plot}")
    if as_json:
        echo_json(result.to_json())
    else:
        click.echo(result.table(fmt=fmt, sort=flags.sort, top=flags.top))
    if result.passed:
        return
    assert result.tolerance is not None
    failures = result.failures
    if failures:
        worst = ", ".join(f"{t.name} ({_why(t)})" for t in failures[:5]) + (
            f" and {len(failures) - 5} more" if len(failures) > 5 else ""
        )
        note(
            f"{len(failures)} of {count(len(result.tensors), 'tensor')} outside "
            f"{result.tolerance.describe()}; worst: {worst}"
        )
    if result.unpaired:
        from ckptsurgery.keygroups import group_keys

        keys = ", ".join(group_keys(result.unpaired))
        note(f"{count(len(result.unpaired), 'key')} without a pair: {keys}")
    raise click.exceptions.Exit(1)


def _why(t: TensorDiff) -> str:
    """Why a tensor failed its check, in a few words."""
    if not t.compared:
        return "shapes differ"
    stats = f"max |a-b| {t.max_abs:.3g}, rel L2 {t.rel_l2:.3g}"
    if t.sums.outside:
        return f"{t.sums.outside:,} of {t.numel:,} elements outside, {stats}"
    if t.dtype_a != t.dtype_b:
        return f"dtype {t.dtype_a} vs {t.dtype_b}, {stats}"
    return f"bytes differ, {stats}"
