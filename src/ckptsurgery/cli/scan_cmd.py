from __future__ import annotations

import click

from ckptsurgery.cli._common import echo_json
from ckptsurgery.io.scan import scan_file
from ckptsurgery.tables import table


@click.command("scan")
@click.argument("src")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def scan_cmd(src: str, as_json: bool) -> None:
    """List the pickle globals a torch file references, and which are safe to load.

    Nothing is unpickled and no tensor is loaded: the pickle is disassembled as data. Exit
    code 1 when an unsafe global is present.

    \b
    Example:
      ckptsurgery scan downloaded.pth --json
    """
    fmt, refs = scan_file(src)
    unsafe = [r.name for r in refs if not r.safe]
    if as_json:
        echo_json(
            {
                "source": src,
                "format": fmt,
                "globals": [{"name": r.name, "safe": r.safe} for r in refs],
                "unsafe": unsafe,
            }
        )
    else:
        if refs:
            click.echo(
                table(
                    ((r.name, "safe" if r.safe else "UNSAFE") for r in refs), ("global", "verdict")
                )
            )
        else:
            click.echo(f"{src}: {fmt}, no pickle globals")
        click.echo()
        click.echo(
            f"{len(refs)} globals, {len(unsafe)} unsafe"
            + (
                f" ({', '.join(unsafe)}): load with --allow-global NAME or "
                "--unsafe-pickle only if you trust the file"
                if unsafe
                else ""
            )
        )
    if unsafe:
        raise click.exceptions.Exit(1)
