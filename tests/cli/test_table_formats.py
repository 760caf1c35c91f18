"""``--fmt FORMAT`` through the CLI: golden tables of the fixtures in GitHub, grid and plain
layout, the default unchanged, and ``--json`` unaffected.

Regenerate the golden files with ``UPDATE_GOLDEN=1 pytest tests/cli/test_table_formats.py``.
"""

from __future__ import annotations

import pytest
from conftest import check_golden, cli_run

MODEL = "fixtures.make_fixtures:tinynet"  # resolved from the current folder: the repo root

pytestmark = pytest.mark.usefixtures("in_repo_root")


def test_inspect_github() -> None:
    result = cli_run("inspect", "fixtures/dino_tinynet.pth", "--key", "student", "--fmt", "github")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[2].startswith("| key ") and lines[2].endswith(" | numel   |")
    assert set(lines[3]) == {"|", "-"}
    assert lines[4].startswith("| module.backbone.conv1.weight ")
    check_golden("inspect_dino_student_github.txt", result.stdout)


def test_diff_grid() -> None:
    """The shape mismatch table of ``diff`` (a report section, indented) in grid layout."""
    args = (
        "diff",
        "fixtures/tinynet.safetensors",
        "--model",
        MODEL,
        "--model-arg",
        "num_classes=5",
    )
    result = cli_run(*args, "--fmt", "grid")
    assert result.exit_code == 1, result.output
    assert "  +===" in result.stdout and "  | fc.weight | [10, 16]" in result.stdout
    check_golden("diff_tinynet_head5_grid.txt", result.stdout)


def test_scan_and_inspect_groups_plain() -> None:
    result = cli_run("scan", "fixtures/moco_tinynet.pth.tar", "--fmt", "plain")
    assert result.exit_code == 0, result.output
    text = result.stdout
    result = cli_run("inspect", "fixtures/moco_tinynet.pth.tar", "--depth", "2", "--fmt", "plain")
    assert result.exit_code == 0, result.output
    text += "\n" + result.stdout
    assert "---" not in text  # plain: no rules
    check_golden("scan_inspect_moco_plain.txt", text)


@pytest.mark.parametrize(
    "args",
    [
        ("inspect", "fixtures/tinynet.safetensors"),
        ("inspect", "fixtures/lightning_tinynet.ckpt", "--depth", "1"),
        ("scan", "fixtures/dp_tinynet.pth"),
        ("diff", "fixtures/dp_tinynet.pth", "--against", "fixtures/tinynet.safetensors"),
    ],
)
def test_simple_is_the_default_and_json_ignores_fmt(args: tuple[str, ...]) -> None:
    plain, simple = cli_run(*args), cli_run(*args, "--fmt", "simple")
    assert plain.stdout == simple.stdout and plain.exit_code == simple.exit_code
    assert "---  " in plain.stdout or "matched 0 of" in plain.stdout
    as_json = cli_run(*args, "--json")
    assert cli_run(*args, "--json", "--fmt", "grid").stdout == as_json.stdout
    assert as_json.stdout.startswith("{")


def test_unknown_format_is_a_usage_error() -> None:
    result = cli_run("inspect", "fixtures/tinynet.safetensors", "--fmt", "html")
    assert result.exit_code == 2
    assert "Invalid value for '--fmt'" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("command", ["inspect", "diff", "scan", "evaluate", "train"])
def test_table_commands_offer_fmt(command: str) -> None:
    result = cli_run(command, "--help")
    assert result.exit_code == 0
    assert "--fmt FORMAT" in result.stdout and "github" in result.stdout
