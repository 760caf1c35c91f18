"""The command line: one file per command, each parsing options, calling the library, rendering.

Every failure becomes one ``Error: ...`` line on stderr (plus at most one short hint line)
and exit code 2, here and nowhere else: the :class:`~ckptsurgery.errors.CheckpointError`
family and click's usage errors as they are, an ``OSError`` naming its file, and anything
else as a bug in ckptsurgery. ``--debug`` shows the traceback instead. Ctrl-C and SIGTERM
exit 130 with "Interrupted; nothing was written." (atomic writes remove their temporary file
on the way out).
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator, Mapping, MutableMapping
from types import FrameType
from typing import Any, NoReturn

import click

from ckptsurgery._version import __version__
from ckptsurgery.errors import CheckpointError
from ckptsurgery.rules import UnusedPatternWarning


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process stands so that ``finally`` blocks and atomic writes
    clean up as they do for Ctrl-C (a KeyboardInterrupt subclass for that reason)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> NoReturn:
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    # Only the main thread may install handlers (CliRunner may run us elsewhere).
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Set by the group's callback once `--debug` is parsed; reset by every `main` call.
_debug = False


class _Escaped(BaseException):
    """Carries an EOFError or KeyboardInterrupt past ``click.Group.main``.

    click turns both into ``Abort`` (printing a blank line first), which would make a
    truncated pickle's EOFError look like Ctrl-C; wrapped, they reach our handler intact.
    """

    def __init__(self, original: EOFError | KeyboardInterrupt) -> None:
        super().__init__(original)
        self.original = original


class _Cli(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (EOFError, KeyboardInterrupt) as e:
            raise _Escaped(e) from e

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        global _debug
        _debug = False
        try:
            try:
                with _sigterm_as_interrupt(), warnings.catch_warnings():
                    # The commands print unused rules and allow globs as notes of their own.
                    warnings.simplefilter("ignore", UnusedPatternWarning)
                    rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except _Escaped as escaped:
                raise escaped.original from None
        except click.exceptions.NoArgsIsHelpError as e:
            # `ckptsurgery` (or a group) alone: show the help, as `--help` would.
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.UsageError as e:
            message = _one_line(e.format_message()).rstrip(".")
            click.echo(
                f"Error: {message} (see '{self._usage_path(e, args, prog_name)} --help')", err=True
            )
            sys.exit(2)
        except CheckpointError as e:
            _fail(e, _one_line(str(e)) or type(e).__name__, debug=_debug)
        except click.ClickException as e:
            click.echo(f"Error: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing was written.", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(1)
        except Exception as e:  # the one place every other failure becomes a message
            message, hint = describe_exception(e)
            _fail(e, message, hint=hint, debug=_debug)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    def _usage_path(self, e: click.UsageError, args: Any, prog_name: str | None) -> str:
        """The command whose --help would explain a usage error."""
        if e.ctx is not None:
            return e.ctx.command_path
        # click raises some parser errors (an option short of its arguments) without a
        # context; the command is then the first word that is not an option.
        words = [str(w) for w in (sys.argv[1:] if args is None else args)]
        name = next((w for w in words if not w.startswith("-")), None)
        prog = prog_name or "ckptsurgery"
        return f"{prog} {name}" if name in self.commands else prog


def _one_line(message: str) -> str:
    # Scripts rely on errors being exactly one "Error: ..." line on stderr.
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


_BUG_HINT = "This is a bug in ckptsurgery; rerun with --debug for the traceback and report it."


def describe_exception(e: Exception) -> tuple[str, str | None]:
    """The ``Error:`` text and an optional hint line for an exception outside our family."""
    if isinstance(e, OSError):
        what = e.strerror or _one_line(str(e)) or type(e).__name__
        names = [n for n in (e.filename, e.filename2) if n is not None]
        where = " -> ".join(repr(str(n)) for n in names)
        return (f"{where}: {what}" if where else what), None
    if isinstance(e, MemoryError):
        return (
            "out of memory (the input declares more data than this machine can hold)",
            "Check that the file is a real checkpoint; rerun with --debug for details.",
        )
    if isinstance(e, RecursionError):
        return "the input is nested too deeply to process", _BUG_HINT
    detail = _one_line(str(e))
    message = f"internal error: {type(e).__name__}" + (f": {detail}" if detail else "")
    return message, _BUG_HINT


def _fail(e: BaseException, message: str, *, hint: str | None = None, debug: bool) -> NoReturn:
    if debug:
        traceback.print_exception(e, file=sys.stderr)
    click.echo(f"Error: {message}", err=True)
    if hint:
        click.echo(hint, err=True)
    sys.exit(2)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckptsurgery")
@click.option(
    "--debug",
    is_flag=True,
    help="Print the full traceback of an error (for bug reports).",
)
def cli(debug: bool) -> None:
    """PyTorch checkpoint surgery: inspect, filter, rename and match checkpoints.

    \b
    Example:
      ckptsurgery inspect moco_v2.pth.tar --depth 2
      ckptsurgery remap moco_v2.pth.tar -o backbone.safetensors \\
          --keep 'module.encoder_q.*' --drop 'module.encoder_q.fc.*' \\
          --strip-prefix module.encoder_q.
    """
    global _debug
    _debug = debug


class _LazyCommands(MutableMapping[str, click.Command]):
    """The commands by name, each imported when first looked up.

    ``ckptsurgery inspect`` then imports what inspect needs and not what merge, apply or
    train do; listing the names (``--help``, a typo's message) imports nothing.
    """

    def __init__(self, entries: Mapping[str, str]) -> None:
        # name -> "module:attribute", replaced by the command once imported
        self._entries: dict[str, click.Command | str] = dict(entries)

    def __getitem__(self, name: str) -> click.Command:
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = self._entries[name] = getattr(importlib.import_module(module), attr)
        return entry

    def __setitem__(self, name: str, command: click.Command) -> None:
        self._entries[name] = command

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


cli.commands = _LazyCommands(
    {
        name: f"ckptsurgery.cli.{name}_cmd:{name}_cmd"
        for name in (
            "inspect",
            "diff",
            "remap",
            "scan",
            "train",
            "evaluate",
            "merge",
            "apply",
            "plot",
        )
    }
)


def main() -> None:
    cli.main(prog_name="ckptsurgery")
