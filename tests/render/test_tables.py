"""The table layout: tabulate's formats with number parsing off; "simple" by default."""

from __future__ import annotations

import pytest
import tabulate

from ckptsurgery.render.tables import TABLE_FORMATS, mapping_table, table

ROWS = [("module.fc.weight", "[10, 512]", "float32", "5,120"), ("fc.bias", "[10]", "f16", "")]
HEADERS = ("key", "shape", "dtype", "numel")


def test_layout() -> None:
    assert table(ROWS, HEADERS) == (
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


def test_cells_are_text_as_written() -> None:
    """No number parsing: numbers-looking cells keep their text and stay left-aligned; None is
    an empty cell, cells are stripped, no line ends in spaces."""
    text = table([("007", "1,234", -3.5, None, True, "  pad  ")], ("a", "b", "c", "d", "e", "f"))
    assert text.splitlines() == [
        "a    b      c     d    e     f",
        "---  -----  ----  ---  ----  ---",
        "007  1,234  -3.5       True  pad",
    ]


def test_github_grid_and_plain() -> None:
    assert table(ROWS, HEADERS, fmt="github").splitlines() == [
        "| key              | shape     | dtype   | numel   |",
        "|------------------|-----------|---------|---------|",
        "| module.fc.weight | [10, 512] | float32 | 5,120   |",
        "| fc.bias          | [10]      | f16     |         |",
    ]
    assert table(ROWS, HEADERS, fmt="grid").splitlines() == [
        "+------------------+-----------+---------+---------+",
        "| key              | shape     | dtype   | numel   |",
        "+==================+===========+=========+=========+",
        "| module.fc.weight | [10, 512] | float32 | 5,120   |",
        "+------------------+-----------+---------+---------+",
        "| fc.bias          | [10]      | f16     |         |",
        "+------------------+-----------+---------+---------+",
    ]
    assert mapping_table({"epoch": "int"}, ("entry", "type"), fmt="plain") == (
        "entry    type\nepoch    int"
    )


def test_formats_are_tabulates() -> None:
    assert TABLE_FORMATS[0] == "simple"
    assert len(set(TABLE_FORMATS)) == len(TABLE_FORMATS)
    assert set(TABLE_FORMATS) <= set(tabulate.tabulate_formats)
    for fmt in TABLE_FORMATS:
        text = table(ROWS, HEADERS, fmt=fmt)
        assert "module.fc.weight" in text and "5,120" in text, fmt


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown table format 'html'"):
        table(ROWS, HEADERS, fmt="html")
