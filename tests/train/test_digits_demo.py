"""The digits demo end to end (``demo/digits.py``, what ``make demo`` runs last): a real MNIST
CNN, remapped by a recipe through the gate, fine-tuned on the real UCI digits, with one seed.

Transfer must pay: every mode that starts from the MNIST weights reaches 0.94 test accuracy
and beats training from scratch by 0.04 or more; so do the EMA and the averaged weights of the
run with timm's recipe.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from test_train_support import run_in_session

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TRANSFER = ("linear probe", "full", "discriminative")


def test_every_transfer_mode_beats_scratch_on_the_uci_digits(tmp_path: Path) -> None:
    missing = [m for m in ("sklearn", "digit_recognizer") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"the digits demo needs the demo extra ({', '.join(missing)} not installed): "
            "pip install -e '.[demo]' (make test installs it)"
        )
    out = tmp_path / "digits"
    proc = run_in_session(
        [sys.executable, str(REPO / "demo" / "digits.py"), str(out), "--seed", "0"],
        cwd=tmp_path,
        timeout=900,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # The surgery did something: the keys did not line up, --suggest found every layer (the
    # embedding and the head renamed inside the network too), the recipe renamed everything
    # but the head, and the gate let it through.
    assert "10 of 10 model tensors would match" in proc.stdout
    assert "matched 8 of 10 model tensors" in proc.stdout and "compatible" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    top1 = {r["mode"]: r["test_top1"] for r in summary["runs"]}
    assert set(top1) == {"scratch", *TRANSFER}
    assert {r["test_samples"] for r in summary["runs"]} == {899}  # the stratified half
    for mode in TRANSFER:
        assert top1[mode] >= 0.94, top1
        assert top1[mode] >= top1["scratch"] + 0.04, top1
    assert "test accuracy" in proc.stdout  # the table
    # timm's recipe on the same data: the EMA and the top-3 average evaluate and transfer too.
    recipe = summary["recipe"]
    assert set(recipe) == {"raw (best epoch)", "EMA", "averaged (top 3)"}
    assert min(recipe.values()) >= 0.94, recipe
    assert "averaged (top 3)" in proc.stdout and "EMA (epoch" in proc.stdout
