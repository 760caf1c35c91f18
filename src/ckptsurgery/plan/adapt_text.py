"""The text forms of adapter parameters: row indices (``"0,5,7-9"``, a file of them) and grid
sizes (``"24x24"``), read and written back; and the error every malformed adapter raises."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckptsurgery.errors import RuleError

__all__ = [
    "AdapterError",
    "check_grid",
    "format_indices",
    "parse_grid",
    "parse_indices",
    "read_indices",
]


class AdapterError(RuleError):
    """An adapter is malformed; ``field`` names the recipe field at fault (or "")."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")


def parse_indices(text: str) -> tuple[int, ...]:
    """``"0,5,7-9"`` -> ``(0, 5, 7, 8, 9)``: numbers and inclusive ranges, separated by commas
    or whitespace (newlines too), ``#`` starting a comment to the end of its line."""
    out: list[int] = []
    words = [w for line in text.splitlines() for w in re.split(r"[,\s]+", line.split("#")[0])]
    for word in filter(None, words):
        if word.isdigit():
            out.append(int(word))
        elif m := _RANGE.match(word):
            lo, hi = int(m[1]), int(m[2])
            if hi < lo:
                raise AdapterError(f"range {word!r} runs backwards; write {hi}-{lo}")
            out.extend(range(lo, hi + 1))
        else:
            raise AdapterError(
                f"{word!r} is not a row index (a whole number >= 0) or a range such as 7-9"
            )
    if not out:
        raise AdapterError("no row index given")
    return tuple(out)


def read_indices(path: Path | str) -> tuple[int, ...]:
    """The indices in the file at ``path``: one a line, or comma-separated (as
    :func:`parse_indices`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AdapterError(f"indices file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterError(f"indices file {str(path)!r} cannot be read: {e}") from None
    try:
        return parse_indices(text)
    except AdapterError as e:
        raise AdapterError(f"indices file {str(path)!r}: {e}") from None


def format_indices(indices: Sequence[int]) -> str:
    """The shortest :func:`parse_indices` text for ``indices``: ascending runs of three or more
    become ranges, ``(0, 1, 2, 3, 7, 5)`` -> ``"0-3,7,5"``."""
    parts: list[str] = []
    i = 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{indices[i]}-{indices[j]}")
        else:
            parts.extend(str(n) for n in indices[i : j + 1])
        i = j + 1
    return ",".join(parts)


def parse_grid(text: str) -> tuple[int, int]:
    """``"24x24"`` (or ``"24"``) -> ``(24, 24)``."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+)\s*)?", text)
    if not m:
        raise AdapterError(f"{text!r} is not a grid size such as 24x24")
    h = int(m[1])
    return check_grid("size", (h, int(m[2]) if m[2] else h))


def check_grid(name: str, value: Any) -> tuple[int, int]:
    """A grid size given as ``"24x24"``, ``[24, 24]`` or ``24``, as ``(24, 24)``; the
    :class:`AdapterError` names field ``name``."""
    if isinstance(value, str):
        return parse_grid(value)
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise AdapterError(
            f"{name} must be a grid [height, width] of whole numbers >= 1, such as [24, 24], "
            f"got {value!r}",
            field=name,
        )
    return int(value[0]), int(value[1])
