"""The public API: every exported name exists, and importing it stays cheap."""

from __future__ import annotations

import subprocess
import sys

import ckptsurgery as cs


def test_every_name_in_all_is_importable() -> None:
    missing = [name for name in cs.__all__ if not hasattr(cs, name)]
    assert missing == []
    assert len(set(cs.__all__)) == len(cs.__all__)


def test_contract_library_names_exist() -> None:
    for name in ("load_state_dict", "Rules", "match", "save_state_dict", "load_into", "merge",
                 "average", "CheckpointError", "IncompatibleCheckpoint"):  # fmt: skip
        assert callable(getattr(cs, name)), name
    assert issubclass(cs.IncompatibleCheckpoint, cs.CheckpointError)


def test_star_import_and_no_torch() -> None:
    code = "from ckptsurgery import *; import sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
