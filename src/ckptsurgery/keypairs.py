"""Pairs of keys and the renames they vote for: the raw material of :mod:`ckptsurgery.suggest`.

A checkpoint key and a model key *pair* when they have the same shape and end the same way;
the part in front of their common ending says what rename would turn one into the other. Also
here: sibling prefixes that become one regex, and inner module renames found by the names and
shapes of a module's tensors.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

from ckptsurgery.errors import RuleError
from ckptsurgery.rules import Rules

Shape = tuple[int, ...]

# Keys are compared on at most this many trailing segments when looking for partners.
TAIL = 2


def sibling_regexes(swaps: Counter[tuple[str, str]]) -> list[tuple[str, str]]:
    """One regex for sibling prefixes that go to the same place, most voted first.

    ``module.net.slice1.`` .. ``module.net.slice4.`` all going to ``features.`` (the layer
    indices continuing across the slices) give ``^module\\.net\\.slice\\d+\\.`` ->
    ``features.``. Only prefixes that differ in the number of one part are siblings.
    """
    groups: dict[tuple[str, str], tuple[set[str], int]] = {}
    for (old, new), votes in swaps.items():
        parts = old.split(".")[:-1]  # a head ends with "."
        for i, part in enumerate(parts):
            m = _NUMBERED_PART.match(part)
            if m is None:
                continue
            pattern = (
                "^"
                + r"\.".join(
                    re.escape(m.group(1)) + r"\d+" if j == i else re.escape(p)
                    for j, p in enumerate(parts)
                )
                + r"\."
            )
            members, total = groups.get((pattern, new), (set(), 0))
            members.add(old)
            groups[(pattern, new)] = (members, total + votes)
    ranked = sorted(
        ((total, key) for key, (members, total) in groups.items() if len(members) > 1),
        reverse=True,
    )
    return [(pattern, new.replace("\\", "\\\\")) for _, (pattern, new) in ranked]


_NUMBERED_PART = re.compile(r"^(.*?)\d+$")


def with_inner_renames(
    ckpt: Mapping[str, Shape], model: Mapping[str, Shape], rename: Rules
) -> Rules:
    """Add a regex for each leftover module that is, by its tensors' names and shapes, the
    one missing module of the model: a head stored as ``module.linear.*`` for ``fc.*``.

    An ``add_prefix`` puts every key under one container, so a module that belongs elsewhere
    (``fc_layers.0`` -> ``backbone.embed.0`` beside ``conv_layers.`` -> ``backbone.features.``)
    cannot be renamed after it: the strip and the add are then tried as one anchored regex,
    which moves only the keys it strips.
    """
    better = _with_module_renames(ckpt, model, rename)
    if better is not rename or not rename.add_prefix or len(rename.strip_prefix) > 1:
        return better
    if rename.regex:
        return rename
    strip = rename.strip_prefix[0] if rename.strip_prefix else ""
    try:
        moved = Rules(
            keep=rename.keep,
            drop=rename.drop,
            replace=rename.replace,
            regex=(("^" + re.escape(strip), rename.add_prefix.replace("\\", "\\\\")),),
        )
        if score(ckpt, model, moved) < score(ckpt, model, rename):
            return rename
    except RuleError:
        return rename
    alternative = _with_module_renames(ckpt, model, moved)
    return alternative if alternative is not moved else rename


def _with_module_renames(
    ckpt: Mapping[str, Shape], model: Mapping[str, Shape], rename: Rules
) -> Rules:
    """:func:`with_inner_renames` for the rules as they are (``rename`` when none helps)."""
    try:
        plan = rename.plan(ckpt)
    except RuleError:
        return rename
    result = {new: ckpt[old] for old, new in plan.renames}
    matched = {n for n, shape in result.items() if model.get(n) == shape}
    leftover = _modules({n: sh for n, sh in result.items() if n not in matched})
    missing = _modules({m: sh for m, sh in model.items() if m not in matched})
    by_signature: dict[frozenset[tuple[str, Shape]], list[str]] = {}
    for module, signature in missing.items():
        by_signature.setdefault(signature, []).append(module)
    leftover_count = Counter(leftover.values())
    regexes: list[tuple[str, str]] = []
    add = rename.add_prefix
    for module, signature in leftover.items():
        targets = by_signature.get(signature, [])
        if len(targets) != 1 or leftover_count[signature] != 1 or targets[0] == module:
            continue
        if not (module.startswith(add) and targets[0].startswith(add)):
            continue
        old, new = module[len(add) :], targets[0][len(add) :]
        if old and new:
            regexes.append(("^" + re.escape(old) + r"\.", new.replace("\\", "\\\\") + "."))
    if not regexes:
        return rename
    try:
        better = Rules(
            keep=rename.keep,
            drop=rename.drop,
            strip_prefix=rename.strip_prefix,
            replace=rename.replace,
            regex=rename.regex + tuple(regexes),
            add_prefix=rename.add_prefix,
        )
        if score(ckpt, model, better) > score(ckpt, model, rename):
            return better
    except RuleError:
        pass
    return rename


def _modules(shapes: Mapping[str, Shape]) -> dict[str, frozenset[tuple[str, Shape]]]:
    """Module path -> its tensors (last name part, shape): ``fc`` -> {weight, bias}."""
    out: dict[str, set[tuple[str, Shape]]] = {}
    for key, shape in shapes.items():
        module, dot, leaf = key.rpartition(".")
        if dot:
            out.setdefault(module, set()).add((leaf, shape))
    return {m: frozenset(s) for m, s in out.items()}


# -- candidates ----------------------------------------------------------------------------


def tail(key: str) -> str:
    return ".".join(key.split(".")[-TAIL:])


def partners(ckpt: Mapping[str, Shape], model: Mapping[str, Shape]) -> Iterable[tuple[str, str]]:
    """(checkpoint key, model key) pairs with the same shape and the same last segments.

    Of a checkpoint key's candidates, only those that share the most trailing segments with it
    are paired: ``encoder.layer.3.output.dense.weight`` pairs with
    ``bert.encoder.layer.3.output.dense.weight`` and not with the same tensor of every other
    layer, whose votes (one per pair of layers) would drown the one true rename.
    """
    by_tail: dict[tuple[str, Shape], list[str]] = {}
    for m, shape in model.items():
        by_tail.setdefault((tail(m), shape), []).append(m)
    for k, shape in ckpt.items():
        candidates = by_tail.get((tail(k), shape), [])
        lengths = [common_suffix_length(k, m) for m in candidates]
        longest = max(lengths, default=0)
        for m, n in zip(candidates, lengths, strict=True):
            if n == longest:
                yield k, m


def common_suffix_length(a: str, b: str) -> int:
    """How many trailing dotted segments ``a`` and ``b`` share."""
    pa, pb = a.split("."), b.split(".")
    n = 0
    while n < min(len(pa), len(pb)) and pa[-1 - n] == pb[-1 - n]:
        n += 1
    return n


def split_common_suffix(a: str, b: str) -> tuple[str, str]:
    """``("module.fc.weight", "fc.weight")`` -> ``("module.", "")``: the differing heads."""
    pa, pb = a.split("."), b.split(".")
    n = common_suffix_length(a, b)
    head_a = ".".join(pa[: len(pa) - n])
    head_b = ".".join(pb[: len(pb) - n])
    return (head_a + "." if head_a else ""), (head_b + "." if head_b else "")


def embedded(a: str, b: str) -> tuple[str, str] | None:
    """Where the dotted head ``b`` sits inside ``a`` with segments before and after it:
    ``("module.enc.layer3._orig_mod.", "enc.layer3.")`` -> ``("module.", "_orig_mod.")``."""
    pa, pb = a.split(".")[:-1], b.split(".")[:-1]  # heads end with "."
    for i in range(1, len(pa) - len(pb)):
        if pa[i : i + len(pb)] == pb:
            return ".".join(pa[:i]) + ".", ".".join(pa[i + len(pb) :]) + "."
    return None


def common_prefix(a: str, b: str) -> str:
    """The longest common prefix of two dotted heads that ends on a segment boundary."""
    pa, pb = a.split("."), b.split(".")
    out = []
    for x, y in zip(pa, pb, strict=False):
        if x != y or not x:
            break
        out.append(x)
    return ".".join(out) + "." if out else ""


# -- scoring -------------------------------------------------------------------------------


def score(ckpt: Mapping[str, Shape], model: Mapping[str, Shape], rules: Rules) -> int:
    plan = rules.plan(ckpt)
    return sum(1 for old, new in plan.renames if model.get(new) == ckpt[old])


def outcome(ckpt: Mapping[str, Shape], rules: Rules) -> frozenset[str]:
    return frozenset(new for _, new in rules.plan(ckpt).renames)
