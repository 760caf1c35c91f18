"""Options and helpers shared by the commands."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ckptsurgery.errors import CheckpointError
from ckptsurgery.io import Checkpoint, open_checkpoint
from ckptsurgery.render.tables import TABLE_FORMATS

if TYPE_CHECKING:
    from ckptsurgery.models import BuiltModel

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


def fmt_option(f: F, *, dest: str = "fmt") -> F:
    """``--fmt FORMAT``: every command that prints tables (``fmt`` in the command, or
    ``dest`` where ``fmt`` names something else)."""
    return click.option(
        "--fmt",
        dest,
        type=click.Choice(TABLE_FORMATS),
        metavar="FORMAT",
        default="simple",
        show_default=True,
        help=f"Layout of the tables, one of tabulate's formats: {', '.join(TABLE_FORMATS)} "
        "(github and pipe are Markdown tables). --json is not affected.",
    )(f)


def table_fmt_option(f: F) -> F:
    """``--fmt FORMAT`` as ``table_fmt``, for commands whose ``--format`` is the file's."""
    return fmt_option(f, dest="table_fmt")


def verify_option(f: F) -> F:
    """``--no-verify``: every command that writes a checkpoint."""
    return click.option(
        "--no-verify",
        "no_verify",
        is_flag=True,
        help="Do not read OUT back before reporting success (by default its names, shapes, "
        "dtypes and a CRC-32 of every tensor's bytes are checked first).",
    )(f)


def max_shard_size_option(f: F) -> F:
    """``--max-shard-size SIZE``: every command that writes a checkpoint from tensors."""
    return click.option(
        "--max-shard-size",
        metavar="SIZE",
        default=None,
        help="Write safetensors shards of at most SIZE (5GB, 500MB, 2GiB or bytes) and their "
        "index into the output folder, as transformers does.",
    )(f)


def model_options(f: F) -> F:
    """``--model SPEC`` and ``--model-arg K=V``."""
    f = click.option(
        "--model-arg",
        "model_args",
        multiple=True,
        metavar="K=V",
        help="Keyword argument for the model factory; V is a Python literal "
        "(num_classes=10). Repeatable.",
    )(f)
    f = click.option(
        "--model",
        "model_spec",
        metavar="SPEC",
        default=None,
        help="torchvision:NAME, timm:NAME or package.module:factory (built on the meta device).",
    )(f)
    return f


def allow_options(f: F) -> F:
    """``--allow-missing GLOB`` and ``--allow-unexpected GLOB``."""
    f = click.option(
        "--allow-unexpected",
        multiple=True,
        metavar="GLOB",
        help="Checkpoint keys the model lacks that are acceptable. Repeatable.",
    )(f)
    f = click.option(
        "--allow-missing",
        multiple=True,
        metavar="GLOB",
        help="Model keys the checkpoint lacks that are acceptable (e.g. 'fc.*'). Repeatable.",
    )(f)
    return f


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
