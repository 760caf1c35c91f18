"""Every command documents itself with an example, as `--help` shows it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import cli_run

from ckptsurgery.cli import cli


def test_there_are_commands() -> None:
    assert {"inspect", "remap", "scan"} <= set(cli.commands)


@pytest.mark.parametrize("name", sorted(cli.commands))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_has_help_with_an_example(name: str, flag: str) -> None:
    result = cli_run(name, flag)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "Example" in result.stdout
    assert f"{name} [OPTIONS]" in result.stdout
    # the example runs this very command
    example = result.stdout[result.stdout.index("Example") :]
    assert f"ckptsurgery {name} " in example


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_option_is_documented(name: str) -> None:
    command = cli.commands[name]
    for param in command.params:
        if param.param_type_name == "option":
            assert getattr(param, "help", None), f"{name} {param.opts} has no help text"


def test_top_level_help_lists_every_command() -> None:
    result = cli_run("--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout
    for name in cli.commands:
        assert name in result.stdout


def test_python_dash_m_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ckptsurgery", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    assert "Example" in proc.stdout
    for name in cli.commands:
        assert name in proc.stdout
    assert proc.stderr == ""


def test_no_arguments_prints_the_help() -> None:
    result = cli_run()
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: ")
    assert "Commands:" in result.stdout
    assert result.stderr == ""
