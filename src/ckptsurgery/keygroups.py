"""Compact, readable renderings of long lists of state dict keys.

:func:`group_keys` turns ::

    layer1.0.conv1.weight  layer1.0.bn1.bias  layer1.0.bn1.weight  layer1.1.conv1.weight ...

into patterns such as ``layer1.{0, 1}.bn1.{bias, weight}`` and
``encoder.layers.encoder_layer_{0..11}.ln_1.{bias, weight}``:

- keys that differ only in their last dotted part (the same module) share one pattern,
  the names sorted: ``fc.{bias, weight}``;
- numbered parts with the same stem (``0``, ``1``, ``2``; ``conv1``, ``conv2``;
  ``encoder_layer_0`` ... ``encoder_layer_11``) are collapsed, innermost first:
  ``blocks.{0..11}.attn.qkv.weight``. Runs of three or more consecutive numbers are written
  ``a..b``, shorter runs are listed: ``{0, 1, 3}``, ``{0..5, 7}``.

The rendering is exact: expanding the patterns (:func:`expand_group`) gives back exactly the
input keys, each once. Patterns come out in the order of their first key in the input. Keys
that cannot be written unambiguously (holding ``{``, ``}``, ``,``, whitespace or an empty dotted
part) are passed through as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["expand_group", "group_keys"]

# A stem (empty, or ending in a non-digit) and a number without leading zeros: "conv12".
_NUMBERED = re.compile(r"^((?:.*[^0-9])?)(0|[1-9][0-9]*)$")
_UNGROUPABLE = re.compile(r"[{},\s]")
_RANGE = re.compile(r"^(0|[1-9][0-9]*)\.\.(0|[1-9][0-9]*)$")

# One dotted part of a pattern: the alternatives it stands for (a frozenset of strings).
_Part = frozenset[str]
_Pattern = tuple[_Part, ...]


def group_keys(keys: Iterable[str]) -> list[str]:
    """Render ``keys`` as a short list of brace patterns; see the module docstring."""
    first_seen: dict[str, int] = {}
    literal: list[tuple[int, str]] = []
    patterns: dict[_Pattern, int] = {}  # pattern -> index of its first key in the input
    for key in keys:
        if key in first_seen:
            continue
        index = first_seen[key] = len(first_seen)
        parts = key.split(".")
        if _UNGROUPABLE.search(key) or "" in parts:
            literal.append((index, key))
        else:
            patterns[tuple(frozenset((p,)) for p in parts)] = index

    changed = True
    while changed:
        # Leaves first (the same module's tensors), then numbered blocks innermost first; again
        # until nothing merges, since one kind of merge can enable the other.
        before = len(patterns)
        patterns = _merge_at_leaf(patterns)
        longest = max((len(p) for p in patterns), default=0)
        for position in reversed(range(longest)):
            patterns = _merge_numbered(patterns, position)
        changed = len(patterns) != before

    rendered = [(index, _render(pattern)) for pattern, index in patterns.items()]
    return [text for _, text in sorted(rendered + literal)]


def expand_group(pattern: str) -> list[str]:
    """The keys a pattern of :func:`group_keys` stands for (the inverse of the grouping)."""
    expanded = [""]
    for i, part in enumerate(_split_parts(pattern)):
        alternatives = _expand_part(part)
        sep = "." if i else ""
        expanded = [f"{head}{sep}{alt}" for head in expanded for alt in alternatives]
    return expanded


def _merge_at_leaf(patterns: dict[_Pattern, int]) -> dict[_Pattern, int]:
    """Merge patterns equal but for their last part: the tensors of one module."""
    merged: dict[_Pattern, tuple[set[str], int]] = {}
    for pattern, index in patterns.items():
        head = pattern[:-1]
        if head in merged:
            alternatives, first = merged[head]
            alternatives.update(pattern[-1])
            merged[head] = (alternatives, min(first, index))
        else:
            merged[head] = (set(pattern[-1]), index)
    return {(*head, frozenset(alts)): index for head, (alts, index) in merged.items()}


def _merge_numbered(patterns: dict[_Pattern, int], position: int) -> dict[_Pattern, int]:
    """Merge patterns equal but for a numbered part at ``position`` with the same stem."""
    merged: dict[tuple[object, ...], tuple[_Pattern, set[str], int]] = {}
    out: dict[_Pattern, int] = {}
    for pattern, index in patterns.items():
        stem = _common_stem(pattern[position]) if position < len(pattern) else None
        if stem is None:
            out[pattern] = index
            continue
        group = (len(pattern), stem, pattern[:position], pattern[position + 1 :])
        if group in merged:
            first_pattern, alternatives, first = merged[group]
            alternatives.update(pattern[position])
            merged[group] = (first_pattern, alternatives, min(first, index))
        else:
            merged[group] = (pattern, set(pattern[position]), index)
    for pattern, alternatives, index in merged.values():
        new = (*pattern[:position], frozenset(alternatives), *pattern[position + 1 :])
        out[new] = index
    return out


def _common_stem(part: _Part) -> str | None:
    """The stem every alternative shares before its number, or None if some are not numbered."""
    stems = set()
    for alternative in part:
        m = _NUMBERED.match(alternative)
        if m is None:
            return None
        stems.add(m.group(1))
    return stems.pop() if len(stems) == 1 else None


def _natural(text: str) -> tuple[str, int]:
    m = _NUMBERED.match(text)
    return (m.group(1), int(m.group(2))) if m else (text, -1)


def _render(pattern: _Pattern) -> str:
    return ".".join(_render_part(part) for part in pattern)


def _render_part(part: _Part) -> str:
    if len(part) == 1:
        return next(iter(part))
    stem = _common_stem(part)
    if stem is None:
        return "{" + ", ".join(sorted(part, key=_natural)) + "}"
    numbers = sorted(int(_natural(alt)[1]) for alt in part)
    return stem + "{" + ", ".join(_runs(numbers)) + "}"


def _runs(numbers: list[int]) -> list[str]:
    """``[0, 1, 2, 3, 5, 7, 8]`` -> ``["0..3", "5", "7", "8"]``: ranges of three or more."""
    out: list[str] = []
    start = 0
    for i in range(1, len(numbers) + 1):
        if i == len(numbers) or numbers[i] != numbers[i - 1] + 1:
            run = numbers[start:i]
            if len(run) >= 3:
                out.append(f"{run[0]}..{run[-1]}")
            else:
                out.extend(str(n) for n in run)
            start = i
    return out


def _split_parts(pattern: str) -> list[str]:
    """Split on the dots outside braces."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in pattern:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        # A dot inside braces belongs to a range "a..b".
        if ch == "." and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _expand_part(part: str) -> list[str]:
    if "{" not in part:
        return [part]
    stem, _, rest = part.partition("{")
    body = rest.removesuffix("}")
    out: list[str] = []
    for item in body.split(", "):
        m = _RANGE.match(item)
        if m:
            out.extend(f"{stem}{n}" for n in range(int(m.group(1)), int(m.group(2)) + 1))
        else:
            out.append(f"{stem}{item}")
    return out
