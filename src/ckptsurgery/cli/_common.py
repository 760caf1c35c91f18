"""Options and helpers shared by the commands."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ckptsurgery.io import Checkpoint, open_checkpoint

F = TypeVar("F", bound=Callable[..., Any])


def source_options(f: F) -> F:
    """``--key``, ``--allow-global`` and ``--unsafe-pickle``: every command that reads."""
    f = click.option(
        "--unsafe-pickle",
        is_flag=True,
        help="Unpickle with code execution allowed. Only for files you trust; prints a warning.",
    )(f)
    f = click.option(
        "--allow-global",
        "allow_globals",
        multiple=True,
        metavar="module.Name",
        help="Trust one pickle global (e.g. argparse.Namespace). Repeatable.",
    )(f)
    f = click.option(
        "--key",
        metavar="PATH",
        default=None,
        help="Slash-separated path of the nested state dict to use (e.g. state_dict, model/ema).",
    )(f)
    return f


def open_source(
    path: str, *, key: str | None, allow_globals: tuple[str, ...], unsafe_pickle: bool
) -> Checkpoint:
    """Open a source for a command, saying on stderr what was chosen or trusted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = open_checkpoint(
            path, key=key, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
        )
    for w in caught:
        note(f"Warning: {w.message}")
    if ckpt.key and not key:
        others = ", ".join(ckpt.other_entries) or "none"
        note(f"using the state dict at '{ckpt.key}' (other entries: {others})")
    return ckpt


def note(message: str) -> None:
    click.echo(message, err=True)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))
