"""The shape adapter flags of the surgeries that write (remap, merge): ``--rows``,
``--in-chans``, ``--resample-pos-embed`` and the latter's modifiers."""

from __future__ import annotations

import functools
from typing import Any, cast

import click

from ckptsurgery.cli._options import F


def adapter_options(f: F) -> F:
    """The shape adapters, handed to the command as ``adapters`` (a tuple of
    :mod:`ckptsurgery.plan.adapt` values, in the order: rows, in-chans, resample-pos-embed):
    ``--rows GLOB INDICES``, ``--in-chans KEY N``, ``--resample-pos-embed KEY HxW`` and the
    latter's ``--prefix-tokens``, ``--interpolation``, ``--no-antialias`` and ``--old-size``."""

    @functools.wraps(f)
    def command(
        *args: Any,
        rows: tuple[tuple[str, str], ...],
        in_chans: tuple[tuple[str, int], ...],
        resample_pos_embed: tuple[tuple[str, str], ...],
        prefix_tokens: int | None,
        interpolation: str | None,
        no_antialias: bool,
        old_size: str | None,
        **kwargs: Any,
    ) -> Any:
        from ckptsurgery.plan.adapt import parse_adapter_flags

        if not resample_pos_embed and (
            prefix_tokens is not None or interpolation or no_antialias or old_size
        ):
            raise click.UsageError(
                "--prefix-tokens, --interpolation, --no-antialias and --old-size need "
                "--resample-pos-embed"
            )
        adapters = parse_adapter_flags(
            rows,
            in_chans,
            resample_pos_embed,
            prefix_tokens=1 if prefix_tokens is None else prefix_tokens,
            interpolation=interpolation or "bicubic",
            antialias=False if no_antialias else None,
            old_size=old_size,
        )
        return f(*args, adapters=adapters, **kwargs)

    opts = [
        click.option(
            "--rows",
            multiple=True,
            nargs=2,
            metavar="GLOB INDICES",
            help="Keep these rows (dim 0) of the tensors matching GLOB, and of the .bias beside "
            "a matching .weight: a class subset of a head, a vocabulary subset of an embedding. "
            "INDICES: 0,5,7-9 or @FILE (one a line, or comma-separated). Repeatable.",
        ),
        click.option(
            "--in-chans",
            multiple=True,
            nargs=2,
            type=(str, int),
            metavar="KEY N",
            help="Adapt a first convolution [out, in, kh, kw] to N input channels as timm's "
            "adapt_input_conv does (sum for 1, repeat and rescale for more). Repeatable.",
        ),
        click.option(
            "--resample-pos-embed",
            multiple=True,
            nargs=2,
            metavar="KEY HxW",
            help="Resample an absolute position embedding [1, tokens, dim] to an HxW grid as "
            "timm's resample_abs_pos_embed does (bicubic, antialiased, prefix tokens kept). "
            "Repeatable.",
        ),
        click.option(
            "--prefix-tokens",
            type=click.IntRange(min=0),
            default=None,
            metavar="K",
            help="With --resample-pos-embed: the class / register tokens before the grid, "
            "kept as they are (default 1).",
        ),
        click.option(
            "--interpolation",
            type=click.Choice(INTERPOLATIONS),
            default=None,
            help="With --resample-pos-embed: the interpolation mode (default bicubic).",
        ),
        click.option(
            "--no-antialias",
            is_flag=True,
            help="With --resample-pos-embed: no antialiasing (on by default for bicubic and "
            "bilinear, the modes it applies to).",
        ),
        click.option(
            "--old-size",
            "--old-grid",
            "old_size",
            metavar="HxW",
            default=None,
            help="With --resample-pos-embed: the stored grid, when it is not square.",
        ),
    ]
    wrapped: Any = command
    for opt in reversed(opts):
        wrapped = opt(wrapped)
    return cast(F, wrapped)


# ckptsurgery.plan.adapters.INTERPOLATIONS, spelled here so that --help reads no plan module.
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "nearest-exact", "area")
