"""Which shape adapter turns a checkpoint tensor into the shape the model wants.

A shape mismatch is not always a key to drop. Three are fixed by an adapter of ``remap``:

- a head with more rows than the model's, the other dims equal (1000 ImageNet classes for a
  10-class model): ``--rows GLOB 0-9`` keeps rows of dim 0, and the user chooses which;
- a first conv for another number of input channels, ``[O, I, kh, kw]`` for ``[O, N, kh, kw]``:
  ``--in-chans KEY N`` (timm's ``adapt_input_conv``);
- an absolute position embedding for another grid, ``[1, T, D]`` for ``[1, T', D]`` where
  ``T - k`` and ``T' - k`` are squares for ``k`` prefix tokens (0, 1 or 2):
  ``--resample-pos-embed KEY HxW --prefix-tokens k`` (timm's ``resample_abs_pos_embed``).

:func:`propose_adapters` reads shapes only; the keys it names are the output's (model) keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptsurgery.globs import covering_globs, glob_matches

if TYPE_CHECKING:
    from ckptsurgery.plan import adapt

__all__ = ["Adapter", "propose_adapters"]

Shape = tuple[int, ...]

# The prefix token counts tried for a position embedding, the likeliest first (a class token).
_PREFIX_TOKENS = (1, 0, 2)


@dataclass(frozen=True)
class Adapter:
    """One adapter that fixes the shapes of ``keys``, as data and as ``remap`` words."""

    op: str  # "rows" | "in_chans" | "resample_pos_embed"
    target: str  # the GLOB (rows) or KEY the option names, an output key
    params: Mapping[str, Any]
    args: tuple[str, ...]  # the option as command-line words
    keys: tuple[str, ...]  # the output keys it fixes
    note: str = ""
    checkpoint_shapes: Mapping[str, Shape] = field(default_factory=dict)

    def to_plan(self) -> adapt.Adapter:
        """The adapter itself (what ``remap`` builds from :attr:`args`), for a recipe."""
        from ckptsurgery.plan import adapt

        if self.op == "rows":
            return adapt.Rows(self.target, adapt.parse_indices(str(self.params["indices"])))
        if self.op == "in_chans":
            return adapt.InChans(self.target, int(self.params["in_chans"]))
        h, w = self.params["size"]
        return adapt.ResamplePosEmbed(
            self.target, (int(h), int(w)), prefix_tokens=int(self.params["prefix_tokens"])
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "key": self.target,
            "params": dict(self.params),
            "args": list(self.args),
            "matches": len(self.keys),
            "keys": list(self.keys),
            "note": self.note,
        }


def propose_adapters(
    mismatched: Mapping[str, tuple[Shape, Shape]], universe: list[str]
) -> list[Adapter]:
    """The adapters for ``mismatched`` (output key -> (checkpoint shape, model shape)).

    ``universe`` holds every output key, so that a ``--rows`` glob reaches no other key. Keys
    no adapter fixes are left out.
    """
    out: list[Adapter] = []
    rows: dict[int, list[str]] = {}  # rows kept -> keys
    for key, (have, want) in mismatched.items():
        n = _rows(have, want)
        if n is not None:
            rows.setdefault(n, []).append(key)
            continue
        adapter = _in_chans(key, have, want) or _pos_embed(key, have, want)
        if adapter is not None:
            out.append(adapter)
    for n, keys in rows.items():
        for glob in covering_globs(keys, universe):
            covered = tuple(k for k in keys if glob_matches(glob, k))
            indices = f"0-{n - 1}" if n > 1 else "0"
            out.append(
                Adapter(
                    op="rows",
                    target=glob,
                    params={"indices": indices},
                    args=("--rows", glob, indices),
                    keys=covered,
                    note=(
                        f"keeps {n} of {mismatched[covered[0]][0][0]} rows; rows {indices} is "
                        "a placeholder: give the indices of the rows (classes) you need, "
                        "or @file.txt"
                    ),
                    checkpoint_shapes={k: mismatched[k][0] for k in covered},
                )
            )
    order = {k: i for i, k in enumerate(mismatched)}
    out.sort(key=lambda a: min(order[k] for k in a.keys))
    return out


def _rows(have: Shape, want: Shape) -> int | None:
    """The rows to keep when ``have`` has more rows than ``want`` and the same other dims."""
    if len(have) != len(want) or not have or have[1:] != want[1:]:
        return None
    return want[0] if 0 < want[0] < have[0] else None


def _in_chans(key: str, have: Shape, want: Shape) -> Adapter | None:
    if len(have) != 4 or len(want) != 4:
        return None
    if have[0] != want[0] or have[2:] != want[2:] or have[1] == want[1] or want[1] < 1:
        return None
    n = want[1]
    how = "summed over the input channels" if n == 1 else "repeated and rescaled"
    return Adapter(
        op="in_chans",
        target=key,
        params={"in_chans": n},
        args=("--in-chans", key, str(n)),
        keys=(key,),
        note=f"{have[1]} -> {n} input channels ({how}, as timm's adapt_input_conv)",
        checkpoint_shapes={key: have},
    )


def _pos_embed(key: str, have: Shape, want: Shape) -> Adapter | None:
    if len(have) != 3 or len(want) != 3 or have[0] != 1 or want[0] != 1:
        return None
    if have[2] != want[2] or have[1] == want[1] or "pos" not in key.lower():
        return None
    for k in _PREFIX_TOKENS:
        old, new = _side(have[1] - k), _side(want[1] - k)
        if old is None or new is None:
            continue
        grid = f"{new}x{new}"
        return Adapter(
            op="resample_pos_embed",
            target=key,
            params={"size": [new, new], "prefix_tokens": k},
            args=("--resample-pos-embed", key, grid, "--prefix-tokens", str(k)),
            keys=(key,),
            note=f"{old}x{old} -> {grid} grid, {k} prefix token(s) kept (bicubic, antialias)",
            checkpoint_shapes={key: have},
        )
    return None


def _side(n: int) -> int | None:
    """The side of a square grid of ``n`` cells, or None."""
    if n < 1:
        return None
    r = math.isqrt(n)
    return r if r * r == n else None
