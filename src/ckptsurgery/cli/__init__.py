"""The command line: one file per command, each parsing options, calling the library, rendering.

Errors of the :class:`~ckptsurgery.errors.CheckpointError` family (and click's usage errors)
become one ``Error: ...`` line on stderr and exit code 2, here and nowhere else.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ckptsurgery import __version__
from ckptsurgery.errors import CheckpointError


class _Cli(click.Group):
    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
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
            click.echo(f"Error: {_one_line(str(e))}", err=True)
            sys.exit(2)
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


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckptsurgery")
def cli() -> None:
    """PyTorch checkpoint surgery: inspect, filter, rename and match checkpoints.

    \b
    Example:
      ckptsurgery inspect moco_v2.pth.tar --depth 2
      ckptsurgery remap moco_v2.pth.tar -o backbone.safetensors \\
          --keep 'module.encoder_q.*' --drop 'module.encoder_q.fc.*' \\
          --strip-prefix module.encoder_q.
    """


def _register() -> None:
    from ckptsurgery.cli.apply_cmd import apply_cmd
    from ckptsurgery.cli.diff_cmd import diff_cmd
    from ckptsurgery.cli.evaluate_cmd import evaluate_cmd
    from ckptsurgery.cli.inspect_cmd import inspect_cmd
    from ckptsurgery.cli.merge_cmd import merge_cmd
    from ckptsurgery.cli.remap_cmd import remap_cmd
    from ckptsurgery.cli.scan_cmd import scan_cmd
    from ckptsurgery.cli.train_cmd import train_cmd

    cli.add_command(inspect_cmd)
    cli.add_command(diff_cmd)
    cli.add_command(remap_cmd)
    cli.add_command(scan_cmd)
    cli.add_command(train_cmd)
    cli.add_command(evaluate_cmd)
    cli.add_command(merge_cmd)
    cli.add_command(apply_cmd)


_register()


def main() -> None:
    cli.main(prog_name="ckptsurgery")
