from __future__ import annotations

import click

from ckptsurgery.cli._common import echo_json
from ckptsurgery.cli._options import fmt_option
from ckptsurgery.io.scan import scan_file
from ckptsurgery.render.tables import count, table


@click.command("scan")
@click.argument("src")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@fmt_option
def scan_cmd(src: str, as_json: bool, fmt: str) -> None:
    """List the pickle globals a torch file references, and which are safe to load.

    Nothing is unpickled and no tensor is loaded: the pickle is disassembled as data. Each
    global is "safe" (torch's weights-only set), "unsafe" (needs --allow-global) or "DANGEROUS"
    (can run code or touch files). Exit code 1 when any is not safe. The CRC-32 of every
    member of a torch zip archive is checked too (exit code 2 for a corrupt one): inspect and
    diff check only the records they read.

    \b
    Example:
      ckptsurgery scan downloaded.pth --json
    """
    file_format, refs = scan_file(src)
    unsafe = [r.name for r in refs if not r.safe]
    if as_json:
        echo_json(
            {
                "source": src,
                "format": file_format,
                "globals": [
                    {"name": r.name, "safe": r.safe, "dangerous": r.dangerous} for r in refs
                ],
                "unsafe": unsafe,
            }
        )
    elif not refs:
        click.echo(f"{src}: {file_format}, no pickle globals")
    else:
        rows = ((r.name, r.verdict) for r in refs)
        click.echo(table(rows, ("global", "verdict"), fmt=fmt))
        click.echo()
        click.echo(
            f"{count(len(refs), 'global')}, {len(unsafe)} unsafe"
            + (
                f" ({', '.join(unsafe)}): "
                + (
                    "DANGEROUS globals can run code; do not load this file unless you trust it"
                    if any(r.dangerous for r in refs)
                    else "load with --allow-global NAME, or --unsafe-pickle if you trust the file"
                )
                if unsafe
                else ""
            )
        )
    if unsafe:
        raise click.exceptions.Exit(1)
