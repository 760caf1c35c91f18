"""Options and helpers shared by the commands."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from ckptsurgery.errors import CheckpointError
from ckptsurgery.io import Checkpoint, open_checkpoint

if TYPE_CHECKING:
    from ckptsurgery.models import BuiltModel


def build_target(spec: str, model_args: tuple[str, ...]) -> BuiltModel:
    """Build the model of ``--model`` (on meta), saying on stderr when it could not be."""
    from ckptsurgery.models import build_model, parse_model_args

    built = build_model(spec, parse_model_args(model_args))
    if built.note:
        note(f"note: {built.note}")
    return built


def selection_note(found_key: str | None, given_key: str | None, other: dict[str, str]) -> None:
    """Say which nested state dict was picked, when the user did not pick it."""
    if found_key and not given_key:
        others = ", ".join(other) or "none"
        note(f"using the state dict at '{found_key}' (other entries: {others})")


@contextlib.contextmanager
def warnings_as_notes() -> Iterator[None]:
    """Library warnings (``--unsafe-pickle``) become ``Warning:`` lines on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                note(f"Warning: {w.message}")


def open_source(
    path: str, *, key: str | None, allow_globals: tuple[str, ...], unsafe_pickle: bool
) -> Checkpoint:
    """Open a source for a command, saying on stderr what was chosen or trusted."""
    with warnings_as_notes():
        ckpt = open_checkpoint(
            path, key=key, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
        )
    selection_note(ckpt.key, key, ckpt.other_entries)
    return ckpt


def note(message: str) -> None:
    click.echo(message, err=True)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


@contextlib.contextmanager
def refusals(*, as_json: bool, fmt: str = "simple", **context: Any) -> Iterator[None]:
    """Every refusal of the command inside, rendered one way (see
    :mod:`ckptsurgery.plan.gate`): with ``--json`` its JSON object on stdout, else the match
    report (if any) as a table; then the ``Error:`` line on stderr. A gate that refused
    exits 1; any other refusal goes on to the CLI's handler (exit 2)."""
    try:
        yield
    except CheckpointError as e:
        from ckptsurgery.plan.gate import refusal

        r = refusal(e, **context)
        if as_json:
            echo_json(r.to_json())
        elif r.report is not None:
            click.echo(r.text(fmt=fmt))
        if r.exit_code == 1:
            note(r.error_line())
            raise click.exceptions.Exit(1) from None
        raise
