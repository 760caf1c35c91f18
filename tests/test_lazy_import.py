"""Reading a safetensors header or renaming its keys must not pay for importing torch.

Each check runs in a fresh interpreter, drives the CLI's ``main`` in-process, and then asserts
that ``torch`` never entered ``sys.modules``.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import run_without_torch


def write_safetensors(path: Path) -> Path:
    """A two-tensor safetensors file written by hand (this test must not need torch either)."""
    header = {
        "module.fc.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "module.fc.bias": {"dtype": "F16", "shape": [2], "data_offsets": [16, 20]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    data = struct.pack("<4f", 1.0, -0.0, float("nan"), 2.5) + b"\x00\x3c\x00\xbc"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_import_does_not_import_torch(tmp_path: Path) -> None:
    run_without_torch(
        """
        import ckptsurgery
        ckptsurgery.Rules(strip_prefix=["module."]).plan(["module.a"])
        """,
        tmp_path,
    )


def test_import_is_lazy() -> None:
    """``import ckptsurgery`` loads no command, no third-party package and no heavy module."""
    script = textwrap.dedent(
        """
        import sys
        import ckptsurgery

        heavy = ("torch", "click", "numpy", "safetensors", "tabulate", "ckptsurgery.cli",
                 "ckptsurgery.merge", "ckptsurgery.recipe", "ckptsurgery.train",
                 "ckptsurgery.match", "ckptsurgery.loading", "ckptsurgery.models",
                 "ckptsurgery.surgery", "ckptsurgery.io", "ckptsurgery.render")
        loaded = sorted(m for m in sys.modules if m.startswith(heavy))
        assert not loaded, loaded
        print("LAZY")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0 and "LAZY" in proc.stdout, proc.stdout + proc.stderr


def test_exports_resolve() -> None:
    """Every name of ``__all__`` resolves, ``dir()`` lists it, and the functions named like
    their modules (``merge``, ``match``, ``suggest``, ``train``) stay functions once those
    modules are imported."""
    import ckptsurgery as cs
    import ckptsurgery.io
    import ckptsurgery.match
    import ckptsurgery.merge
    import ckptsurgery.suggest
    import ckptsurgery.train

    assert set(cs.__all__) == set(cs._EXPORTS) | {"__version__"}
    assert set(cs.__all__) <= set(dir(cs))
    for name in cs.__all__:
        assert getattr(cs, name) is not None
    for name in ("merge", "match", "suggest", "train"):
        assert callable(getattr(cs, name)) and not isinstance(getattr(cs, name), type(cs))
    from ckptsurgery import merge, train

    assert merge is cs.merge and train is cs.train
    assert set(ckptsurgery.io.__all__) == set(ckptsurgery.io._EXPORTS)
    for name in ckptsurgery.io.__all__:
        getattr(ckptsurgery.io, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cs.nope  # noqa: B018
    with pytest.raises(ImportError):
        from ckptsurgery import nope  # noqa: F401


def test_inspect_imports_only_what_it_needs(tmp_path: Path) -> None:
    """``ckptsurgery inspect`` loads neither the other commands nor the writing side; tabulate
    only when it prints a table (not for ``--json``)."""
    write_safetensors(tmp_path / "m.safetensors")
    run_without_torch(
        """
        unwanted = ("ckptsurgery.merge", "ckptsurgery.recipe", "ckptsurgery.train",
                    "ckptsurgery.match", "ckptsurgery.loading", "ckptsurgery.models",
                    "ckptsurgery.surgery", "ckptsurgery.io.writer", "ckptsurgery.io.atomic", "ckptsurgery.cli.merge_cmd",
                    "ckptsurgery.cli.train_cmd", "numpy")
        cli("inspect", "m.safetensors", "--json")
        loaded = sorted(m for m in sys.modules if m.startswith((*unwanted, "tabulate")))
        assert not loaded, loaded
        cli("inspect", "m.safetensors")
        assert "tabulate" in sys.modules
        loaded = sorted(m for m in sys.modules if m.startswith(unwanted))
        assert not loaded, loaded
        """,
        tmp_path,
    )


def test_recipes_read_and_write_without_torch(tmp_path: Path) -> None:
    """``ckptsurgery.recipe`` imports its names on first use; reading and writing a recipe
    needs no torch (running one does)."""
    write_safetensors(tmp_path / "m.safetensors")
    run_without_torch(
        """
        import ckptsurgery.recipe
        assert "ckptsurgery.recipe.read" not in sys.modules, sorted(sys.modules)
        from ckptsurgery import Rules
        from ckptsurgery.recipe import Target, parse_recipe, recipe_toml

        rules = Rules(strip_prefix=["module."])
        text = recipe_toml([("m.safetensors", None, rules)], Target("m:f"), "out.safetensors")
        assert parse_recipe(text).sources[0].rules == rules
        """,
        tmp_path,
    )


def test_help_does_not_import_torch_or_tabulate(tmp_path: Path) -> None:
    proc = run_without_torch(
        """
        cli("--help")
        cli("remap", "--help")
        cli("inspect", "--help")
        cli("diff", "--help")
        loaded = sorted(m for m in sys.modules if m.startswith(("tabulate", "numpy")))
        assert not loaded, loaded
        """,
        tmp_path,
    )
    assert "Usage:" in proc.stdout and "--fmt FORMAT" in proc.stdout


@pytest.mark.parametrize("extra", [[], ["--json"], ["--depth", "1"]])
def test_inspect_safetensors_does_not_import_torch(tmp_path: Path, extra: list[str]) -> None:
    write_safetensors(tmp_path / "m.safetensors")
    proc = run_without_torch(f'cli("inspect", "m.safetensors", *{extra!r})\n', tmp_path)
    assert "module" in proc.stdout and "safetensors" in proc.stdout


def test_remap_safetensors_to_safetensors_does_not_import_torch(tmp_path: Path) -> None:
    src = write_safetensors(tmp_path / "m.safetensors")
    proc = run_without_torch(
        """
        cli("remap", "m.safetensors", "-o", "out.safetensors", "--strip-prefix", "module.",
            "--replace", "fc", "head", "--add-prefix", "model.", "--dry-run")
        cli("remap", "m.safetensors", "-o", "out.safetensors", "--strip-prefix", "module.",
            "--replace", "fc", "head", "--add-prefix", "model.")
        """,
        tmp_path,
    )
    assert "nothing written" in proc.stderr
    out = tmp_path / "out.safetensors"
    data = out.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__")
    assert set(header) == {"model.head.weight", "model.head.bias"}
    # the data section is the source's, byte for byte
    src_data = src.read_bytes()
    (m,) = struct.unpack("<Q", src_data[:8])
    assert data[8 + n :] == src_data[8 + m :]


def test_scan_safetensors_does_not_import_torch(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "m.safetensors")
    run_without_torch('cli("scan", "m.safetensors")\n', tmp_path)


def test_inspect_of_several_state_dicts_does_not_import_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.save(
        {"state_dict": {"w": torch.zeros(2)}, "state_dict_ema": {"w": torch.ones(2)}},
        tmp_path / "ema.pth",
    )
    proc = run_without_torch('cli("inspect", "ema.pth")\n', tmp_path)
    assert "state_dict_ema" in proc.stdout and "2 state dicts" in proc.stdout
