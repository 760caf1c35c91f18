"""The table layout: tabulate's "simple" format (number parsing off), without importing it."""

from __future__ import annotations

import random
from typing import Any

import pytest

from ckptsurgery.tables import table


def test_layout() -> None:
    rows = [("module.fc.weight", "[10, 512]", "float32", "5,120"), ("fc.bias", "[10]", "f16", "")]
    assert table(rows, ("key", "shape", "dtype", "numel")) == (
        "key               shape      dtype    numel\n"
        "----------------  ---------  -------  -------\n"
        "module.fc.weight  [10, 512]  float32  5,120\n"
        "fc.bias           [10]       f16"
    )


def test_no_rows_and_cells_that_span_lines() -> None:
    assert table([], ("dropped",)) == "dropped\n---------"
    assert table([("a\nbb", None, 3)], ("x", "", "n")) == (
        "x        n\n---  --  ---\na        3\nbb"
    )


def test_same_text_as_tabulate() -> None:
    tabulate = pytest.importorskip("tabulate").tabulate
    rng = random.Random(0)
    atoms: list[Any] = ["", " ", "a", "key.weight", "  pad  ", "1,234", "-3.5", None, 7, 0.5]
    atoms += [True, "é", "->", "x\ny", "\n", "a\n\nb"]
    for _ in range(2000):
        n = rng.randint(1, 5)
        headers = [rng.choice(["key", "", "new key", "a b"]) for _ in range(n)]
        rows = [[rng.choice(atoms) for _ in range(n)] for _ in range(rng.randint(0, 5))]
        expected = tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)
        assert table(rows, headers) == expected, (rows, headers)
