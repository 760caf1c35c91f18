"""Few globs that cover exactly a set of keys: what ``--allow-missing`` and ``--drop`` print.

:func:`covering_globs` widens each key to the broadest glob that still matches no key to be
kept. Two shapes of glob are tried, both in the syntax every rule and allow list takes
(fnmatch, where ``*`` also matches dots, ``?`` one character, ``[4-9]`` one of a range):

- a module path: ``classifier.*`` when every ``classifier`` key goes;
- a module path with one numbered part left open, wholly (``layer*.0.downsample.*``,
  ``blocks.*.attn.*``) or from its number on (``features.1[4-9].*``, ``features.[2-9]?.*``:
  the tail of a container), when every key it reaches goes too.

The globs are chosen greedily, the one covering most of what is still uncovered first, so a
long list of per-index lines (``features.14.*``, ``features.15.*`` ...) becomes one line
wherever one line is exact.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Sequence
from fnmatch import fnmatchcase, translate

__all__ = ["covering_globs", "glob_matches"]

# Above this many keys to cover, only module paths are tried (the open-part search is
# quadratic in the number of keys).
_MAX_OPEN_SEARCH = 1000


def glob_matches(glob: str, key: str) -> bool:
    """Whether ``key`` matches ``glob`` (fnmatch, ``*`` matching dots too)."""
    if not _SPECIAL.search(glob):
        return key == glob
    if glob.endswith("*") and not _SPECIAL.search(glob[:-1]):
        return key.startswith(glob[:-1])
    return fnmatchcase(key, glob)


def covering_globs(remove: Sequence[str], universe: Sequence[str]) -> tuple[str, ...]:
    """Few globs that match every key of ``remove`` and no other key of ``universe``.

    A key stays its own full name when no wider glob is exact. The result is in the order of
    the first key each glob covers.
    """
    removing = set(remove)
    keep = [k for k in universe if k not in removing]
    if not remove:
        return ()
    candidates: dict[str, set[str]] = {}  # glob -> the keys of ``remove`` it covers
    kept_prefixes = _prefixes(keep)
    for key in remove:
        parts = key.split(".")
        widest = key
        for depth in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:depth]) + "."
            if prefix in kept_prefixes:
                break
            widest = prefix + "*"
        candidates.setdefault(widest, set())
    if len(remove) <= _MAX_OPEN_SEARCH:
        for glob in _open_candidates(remove):
            candidates.setdefault(glob, set())
    remove_list = list(dict.fromkeys(remove))
    keep_sorted = sorted(keep)
    remove_sorted = sorted(remove_list)
    for glob in list(candidates):
        pattern = _compile(glob)
        head = _SPECIAL.split(glob, maxsplit=1)[0]
        if any(pattern.match(k) for k in _starting_with(keep_sorted, head)):
            del candidates[glob]
            continue
        candidates[glob] = {k for k in _starting_with(remove_sorted, head) if pattern.match(k)}
    uncovered = set(remove_list)
    chosen: list[str] = []
    while uncovered:
        # The widest first; among equals, the one with fewer open parts, then the shorter.
        glob = max(
            candidates,
            key=lambda g: (
                len(candidates[g] & uncovered),
                -_openings(g),
                -(g.count("?") + g.count("[")),  # a plain * reads easiest
                -len(g),
            ),
        )
        gained = candidates[glob] & uncovered
        if not gained:  # cannot happen: every key is its own candidate
            break
        chosen.append(glob)
        uncovered -= gained
    first = {k: i for i, k in enumerate(remove_list)}
    chosen.sort(key=lambda g: min(first[k] for k in candidates[g]))
    return tuple(chosen)


def _openings(glob: str) -> int:
    """How many parts a glob opens, a trailing ``.*`` (a whole module) not counted."""
    return len(_SPECIAL.findall(glob.removesuffix(".*")))


def _starting_with(sorted_keys: Sequence[str], head: str) -> Sequence[str]:
    """The keys of a sorted list that start with ``head``."""
    lo = bisect_left(sorted_keys, head)
    hi = bisect_left(sorted_keys, head + "\U0010ffff")
    return sorted_keys[lo:hi]


def _prefixes(keys: Sequence[str]) -> set[str]:
    """Every dotted prefix (``a.``, ``a.b.``) of ``keys``."""
    out: set[str] = set()
    for key in keys:
        parts = key.split(".")
        for depth in range(1, len(parts)):
            out.add(".".join(parts[:depth]) + ".")
    return out


_NUMBER = re.compile(r"^(.*?)(\d+)$")
_SPECIAL = re.compile(r"[*?\[]")


def _open_candidates(keys: Sequence[str]) -> set[str]:
    """Module paths with one numbered part opened: ``features.14.weight`` gives
    ``features.*.*``, ``features.1?.*``, ``features.1[4-9].*``, ``features.[1-9]?.*`` ...;
    ``layer3.0.conv1.weight`` gives ``layer*.0.*``, ``layer*.0.conv1.*`` ..."""
    out: set[str] = set()
    for key in keys:
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            m = _NUMBER.match(part)
            if m is None:
                continue
            for opened_part in _opened(m.group(1), m.group(2)):
                opened = [*parts[:i], opened_part]
                for depth in range(i + 1, len(parts)):
                    out.add(".".join(opened + parts[i + 1 : depth]) + ".*")
                out.add(".".join(opened + parts[i + 1 :]))
    return out


def _opened(stem: str, number: str) -> list[str]:
    """The ways to open ``stem + number``: any suffix, then ranges of the same length that
    start at ``number`` (its last digit, or its first digit)."""
    out = [stem + "*"]
    last = number[-1]
    out.append(stem + number[:-1] + "?")
    if last < "9":
        out.append(f"{stem}{number[:-1]}[{last}-9]")
    if len(number) > 1 and number[0] < "9":
        out.append(f"{stem}[{number[0]}-9]" + "?" * (len(number) - 1))
    return out


def _compile(glob: str) -> re.Pattern[str]:
    return re.compile(translate(glob))
