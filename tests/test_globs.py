"""covering_globs: few globs, exactly the keys asked for, never one that reaches another key."""

from __future__ import annotations

from fnmatch import fnmatchcase

import pytest

from ckptsurgery.globs import covering_globs


def check(globs: tuple[str, ...], remove: list[str], universe: list[str]) -> None:
    for key in universe:
        hit = any(fnmatchcase(key, g) for g in globs)
        assert hit == (key in remove), (key, globs)


def test_a_whole_module_is_one_glob() -> None:
    universe = [f"features.{i}.weight" for i in range(5)] + [
        f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")
    ]
    remove = [k for k in universe if k.startswith("classifier.")]
    assert covering_globs(remove, universe) == ("classifier.*",)


def test_per_index_lines_collapse_where_exact() -> None:
    """The tail of a container goes: one glob per shape of key, not one per index."""
    universe = [f"features.{i}.{p}" for i in range(20) for p in ("weight", "bias")]
    universe += ["classifier.weight"]
    remove = [k for k in universe if int(k.split(".")[1] if k[0] == "f" else 0) >= 10]
    remove += ["classifier.weight"]
    globs = covering_globs(remove, universe)
    check(globs, remove, universe)
    assert len(globs) < 5  # instead of 11 lines


def test_an_opened_number_in_the_middle() -> None:
    universe = [f"layer{i}.0.{m}.weight" for i in range(1, 5) for m in ("conv1", "downsample")]
    remove = [k for k in universe if "downsample" in k]
    globs = covering_globs(remove, universe)
    check(globs, remove, universe)
    assert globs == ("layer*.0.downsample.*",)


@pytest.mark.parametrize("n", [0, 1, 7])
def test_never_a_glob_over_a_kept_key(n: int) -> None:
    universe = [f"blocks.{i}.attn.{p}" for i in range(8) for p in ("qkv", "proj")]
    remove = [k for k in universe if k.endswith("qkv") and not k.startswith(f"blocks.{n}.")]
    check(covering_globs(remove, universe), remove, universe)


def test_nothing_to_cover() -> None:
    assert covering_globs([], ["a.b"]) == ()
