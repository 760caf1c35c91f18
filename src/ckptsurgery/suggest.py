"""Infer the rules that make a checkpoint's keys line up with a model's.

Suggestions are derived from pairs of keys that agree in shape and end the same way
(``module.encoder_q.layer1.0.conv1.weight`` and ``layer1.0.conv1.weight``; of a key's
candidates, only those sharing the most trailing segments with it): each pair votes for the
rename that would turn one into the other (strip a leading prefix, add one, replace a segment
in the middle, or strip and replace together). The best-voted renames are combined into
candidate :class:`Rules`, each candidate is scored by really planning it and counting the model
keys that then match by name *and* shape, and the leftovers (a momentum encoder, a queue, a
projection head, a head of another size) get the ``keep`` / ``drop`` globs that remove them.
Nothing is applied: the caller prints the result. When two rule sets reach the same score, or
a key could go to two model keys, the :class:`Suggestion` lists the ambiguity (with every
tied rule set, complete) instead of choosing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product

from ckptsurgery.errors import RuleError
from ckptsurgery.globs import covering_globs
from ckptsurgery.keypairs import (
    common_prefix,
    embedded,
    outcome,
    partners,
    score,
    sibling_regexes,
    split_common_suffix,
    tail,
    with_inner_renames,
)
from ckptsurgery.rules import Rules
from ckptsurgery.shape_fit import Adapter, propose_adapters

Shape = tuple[int, ...]

# How many of the best-voted renames of each kind are combined into candidates.
_TOP = 4
# Tied rule sets or partner keys named in one ambiguity message before "and N more".
_MAX_OPTIONS = 4


@dataclass(frozen=True)
class Suggestion:
    """The best rules found, what they reach, and what could not be decided."""

    rules: Rules | None  # None when nothing improves on the keys as they are, or on a tie
    matched_before: int  # model keys matched by name and shape without rules
    matched_after: int  # ... with ``rules``
    model_keys: int
    missing_after: tuple[str, ...]  # model keys still missing with ``rules``
    unexpected_after: tuple[str, ...]  # checkpoint keys (renamed) still left over
    ambiguities: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    # On a tie (``rules`` is None): every rule set that reaches the best score, each complete
    # with its keep / drop globs, for the user to pick from.
    alternatives: tuple[Rules, ...] = field(default=())
    # Globs that cover exactly ``missing_after`` among the model's keys (``("fc.*",)``): what a
    # gate needs in ``allow_missing`` to accept the result.
    allow_missing: tuple[str, ...] = ()
    # Shape mismatches an adapter fixes (``--rows``, ``--in-chans``, ``--resample-pos-embed``),
    # proposed instead of dropping the keys; their keys are neither missing nor unexpected.
    adapters: tuple[Adapter, ...] = ()
    # Each rule of ``rules`` as a CLI flag, and how many checkpoint keys it matches.
    rule_counts: tuple[tuple[str, int], ...] = ()

    @property
    def adapter_args(self) -> list[str]:
        """The adapters as ``remap`` command-line words."""
        return [w for a in self.adapters for w in a.args]

    def remap_command(
        self,
        src: str = "SRC",
        out: str = "OUT",
        *,
        key: str | None = None,
        extra: Sequence[str] = (),
    ) -> str:
        """The ``ckptsurgery remap`` command line that applies the rules, shell-quoted.

        ``key`` is the ``--key`` the source needs; ``extra`` are more words to append (a
        ``--model`` gate). "" when there are no rules.
        """
        if self.rules is None and not self.adapters:
            return ""
        words = ["ckptsurgery", "remap", src, "-o", out]
        if key is not None:
            words += ["--key", key]
        words.extend(rule_args(self.rules or Rules()))
        words.extend(self.adapter_args)
        words.extend(extra)
        return " ".join(shlex.quote(w) for w in words)

    def toml(self) -> str:
        if self.rules is None:
            return ""
        return rules_toml(self.rules)

    def to_dict(self) -> dict[str, object]:
        return {
            "rules": self.rules.to_dict() if self.rules is not None else None,
            "matched_before": self.matched_before,
            "matched_after": self.matched_after,
            "model_keys": self.model_keys,
            "missing_after": list(self.missing_after),
            "unexpected_after": list(self.unexpected_after),
            "ambiguities": list(self.ambiguities),
            "notes": list(self.notes),
            "alternatives": [r.to_dict() for r in self.alternatives],
            "allow_missing": list(self.allow_missing),
            "proposals": [
                {"rule": rule, "matches": n, "kind": "rule"} for rule, n in self.rule_counts
            ]
            + [
                {"rule": shlex.join(a.args), "matches": len(a.keys), "kind": "adapter"}
                for a in self.adapters
            ],
            "adapters": [a.to_dict() for a in self.adapters],
        }


def rule_args(rules: Rules) -> list[str]:
    """The rules as ``remap`` command-line words, in the order they apply."""
    words: list[str] = []
    for g in rules.keep:
        words += ["--keep", g]
    for g in rules.drop:
        words += ["--drop", g]
    for p in rules.strip_prefix:
        words += ["--strip-prefix", p]
    for old, new in rules.replace:
        words += ["--replace", old, new]
    for pattern, repl in rules.regex:
        words += ["--regex", pattern, repl]
    if rules.add_prefix:
        words += ["--add-prefix", rules.add_prefix]
    return words


def rules_toml(rules: Rules) -> str:
    """The rules as a TOML block (the keys of a rules file or a recipe's ``[[source]]``)."""
    import tomli_w

    return tomli_w.dumps(rules.to_dict()).rstrip("\n")


def suggest(
    checkpoint: Mapping[str, Shape] | Mapping[str, Sequence[int]],
    model: Mapping[str, Shape] | Mapping[str, Sequence[int]],
    *,
    ties: Mapping[str, str] | None = None,
) -> Suggestion:
    """The rules that make the most ``model`` keys match ``checkpoint`` keys by name and shape.

    Both arguments map key names to shapes. ``ties`` maps a model key to the first key of its
    tie group (one tensor under several names, as :func:`ckptsurgery.loading.tie_groups` gives):
    a tied name whose partner matches is not counted as missing, as :func:`match` does not.
    """
    ckpt = {k: tuple(v) for k, v in checkpoint.items()}
    target = {k: tuple(v) for k, v in model.items()}
    group = dict(ties or {})
    before = score(ckpt, target, Rules())

    strips: Counter[str] = Counter()
    adds: Counter[str] = Counter()
    replaces: Counter[tuple[str, str]] = Counter()
    swaps: Counter[tuple[str, str]] = Counter()  # whole leading prefix -> another (or none)
    for k, m in partners(ckpt, target):
        kp, mp = split_common_suffix(k, m)
        if kp == mp:
            continue
        if not mp:
            strips[kp] += 1
            swaps[(kp, mp)] += 1
        elif not kp:
            adds[mp] += 1
        elif kp.endswith("." + mp):  # whole segments only: "extra." does not end in "a."
            strips[kp[: len(kp) - len(mp)]] += 1
        elif mp.endswith("." + kp):
            adds[mp[: len(mp) - len(kp)]] += 1
        else:
            head = common_prefix(kp, mp)
            old, new = kp[len(head) :], mp[len(head) :]
            if head and old:
                replaces[(old, new)] += 1
            else:
                strips[kp] += 1
                adds[mp] += 1
                swaps[(kp, mp)] += 1
                inner = embedded(kp, mp)
                if inner is not None:
                    # module.enc.layer3._orig_mod. vs enc.layer3.: strip one, replace the other.
                    strips[inner[0]] += 1
                    replaces[(inner[1], "")] += 1

    strip_opts: list[tuple[str, ...]] = [()] + [(p,) for p, _ in strips.most_common(_TOP)]
    add_opts: list[str] = [""] + [p for p, _ in adds.most_common(_TOP)]
    replace_opts: list[tuple[tuple[str, str], ...]] = [()] + [
        (r,) for r, _ in replaces.most_common(_TOP)
    ]
    candidates: list[Rules] = []
    for strip, add, replace in product(strip_opts, add_opts, replace_opts):
        if strip or add or replace:
            with _suppress_rule_error():
                candidates.append(Rules(strip_prefix=strip, add_prefix=add, replace=replace))
    for regex in sibling_regexes(swaps)[:2]:
        # module.net.slice1.0. .. module.net.slice4.41. -> features.0. .. features.41.
        for replace in replace_opts:
            with _suppress_rule_error():
                candidates.append(Rules(replace=replace, regex=(regex,)))

    scored: list[tuple[int, int, Rules]] = []
    for candidate in candidates:
        try:
            points = score(ckpt, target, candidate)
        except RuleError:
            continue  # e.g. the candidate makes two keys collide
        size = len(candidate.strip_prefix) + bool(candidate.add_prefix) + len(candidate.replace)
        size += len(candidate.regex)
        scored.append((points, -size, candidate))

    notes: list[str] = []
    if not scored or max(s for s, _, _ in scored) <= before:
        best_rename = Rules()
        tied: list[Rules] = []
    else:
        scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
        top_score, top_size = scored[0][0], scored[0][1]
        outcomes: dict[frozenset[str], Rules] = {}
        for s, size, r in scored:
            if s == top_score and size == top_size:
                outcomes.setdefault(outcome(ckpt, r), r)
        tied = list(outcomes.values())
        primary = [r for r in tied if not _is_secondary(r)]
        if primary and len(primary) < len(tied):
            # A momentum / target copy of the network matches as well as the online one;
            # the online one is what fine-tuning starts from (MoCo's encoder_q, BYOL's online).
            skipped = [r for r in tied if _is_secondary(r)]
            notes.append(
                "preferred "
                + " ".join(primary[0].describe())
                + " over the momentum/target copy ("
                + "; ".join(" ".join(r.describe()) for r in skipped)
                + ")"
            )
            tied = primary
        best_rename, tied = tied[0], tied[1:]

    ambiguities: list[str] = []
    if tied:
        complete = [_with_filters(ckpt, target, r, spare=set()) for r in [best_rename, *tied]]
        options = _some([" ".join(r.describe()) for r in complete], sep="; ")
        ambiguities.append(
            f"several rule sets each match {score(ckpt, target, best_rename)} of "
            f"{len(target)} model keys; pick one for remap: {options}"
        )
        return _result(ckpt, target, group, None, before, ambiguities, notes, tuple(complete))

    best_rename = with_inner_renames(ckpt, target, best_rename)
    unsure = _suffix_ambiguities(ckpt, target, best_rename)
    ambiguities.extend(f"{old} could be any of {_some(opts)}" for old, opts in unsure.items())
    adapters, adapted = _adapters(ckpt, target, best_rename)
    found = _with_filters(ckpt, target, best_rename, spare=set(unsure) | adapted)
    useless = found and (not found.plan(ckpt).renames or score(ckpt, target, found) == 0)
    if useless and not adapters:
        # Rules that keep no key, or under which no key matches, make a command that fails
        # (an empty output) or loads nothing: no suggestion rather than that.
        notes.append(
            "no rule found under which a checkpoint key matches a model key by name and "
            "shape; not suggesting to drop every key"
        )
        found = Rules()
    return _result(
        ckpt, target, group, found or None, before, ambiguities, notes, (), tuple(adapters)
    )


def _suppress_rule_error() -> contextlib.AbstractContextManager[None]:
    return contextlib.suppress(RuleError)


def _adapters(
    ckpt: Mapping[str, Shape], model: Mapping[str, Shape], rename: Rules
) -> tuple[list[Adapter], set[str]]:
    """The adapters that fix the shape mismatches left by ``rename``, and the checkpoint
    keys they adapt (which the filters then keep)."""
    try:
        plan = rename.plan(ckpt)
    except RuleError:
        return [], set()
    mismatched = {
        new: (ckpt[old], model[new])
        for old, new in plan.renames
        if new in model and model[new] != ckpt[old]
    }
    if not mismatched:
        return [], set()
    adapters = propose_adapters(mismatched, [new for _, new in plan.renames])
    fixed = {k for a in adapters for k in a.keys}
    return adapters, {old for old, new in plan.renames if new in fixed}


def _some(items: Sequence[str], *, sep: str = ", ") -> str:
    """The first few items, and how many more there are."""
    shown = sep.join(items[:_MAX_OPTIONS])
    more = len(items) - _MAX_OPTIONS
    return f"{shown}{sep}and {more} more" if more > 0 else shown


# Path segments that name the second copy of a network in self-supervised checkpoints.
_SECONDARY = ("encoder_k", "momentum_encoder", "momentum", "target_encoder", "target")


def _is_secondary(rules: Rules) -> bool:
    segments = {seg for p in rules.strip_prefix for seg in p.split(".")}
    segments |= {seg for old, _ in rules.replace for seg in old.split(".")}
    return any(seg in _SECONDARY for seg in segments)


# -- filters for what is left over --------------------------------------------------------


def _with_filters(
    ckpt: Mapping[str, Shape], model: Mapping[str, Shape], rename: Rules, *, spare: set[str]
) -> Rules:
    """Add ``keep`` / ``drop`` globs that remove checkpoint keys matching nothing.

    Keys in ``spare`` (those that could go to several model keys) are left for the user.
    """
    plan = rename.plan(ckpt)
    matched = {old for old, new in plan.renames if model.get(new) == ckpt[old]} | spare
    leftover = [k for k in ckpt if k not in matched]
    if not leftover:
        return rename

    keep: tuple[str, ...] = ()
    if rename.strip_prefix:
        # Everything that matched sits under the stripped prefix (a MoCo query encoder): keep
        # only that subtree, which removes the momentum encoder and the queue in one glob.
        prefix = rename.strip_prefix[0]
        if all(k.startswith(prefix) for k in matched) and any(
            not k.startswith(prefix) for k in leftover
        ):
            keep = (prefix + "*",)
    kept = [k for k in ckpt if not keep or any(k.startswith(g[:-1]) for g in keep)]
    drop = covering_globs([k for k in leftover if k in set(kept)], kept)
    return Rules(
        keep=keep,
        drop=drop,
        strip_prefix=rename.strip_prefix,
        replace=rename.replace,
        regex=rename.regex,
        add_prefix=rename.add_prefix,
    )


def _suffix_ambiguities(
    ckpt: Mapping[str, Shape], model: Mapping[str, Shape], rules: Rules
) -> dict[str, list[str]]:
    """Leftover checkpoint keys that could go to two or more missing model keys."""
    plan = rules.plan(ckpt)
    result = {new: ckpt[old] for old, new in plan.renames}
    missing = {m: s for m, s in model.items() if result.get(m) != s}
    out: dict[str, list[str]] = {}
    for old, new in plan.renames:
        if model.get(new) == ckpt[old]:
            continue
        options = [m for m, s in missing.items() if s == ckpt[old] and tail(m) == tail(new)]
        if len(options) > 1:
            out[old] = options
    return out


def _result(
    ckpt: Mapping[str, Shape],
    model: Mapping[str, Shape],
    group: Mapping[str, str],
    rules: Rules | None,
    before: int,
    ambiguities: list[str],
    notes: list[str],
    alternatives: tuple[Rules, ...],
    adapters: tuple[Adapter, ...] = (),
) -> Suggestion:
    applied = (rules or Rules()).plan(ckpt)
    result = {new: ckpt[old] for old, new in applied.renames}
    matched = [m for m, s in model.items() if result.get(m) == s]
    # A tied name is filled by loading its matched partner (as match() counts it), and an
    # adapted one by the adapter's output.
    adapted = {k for a in adapters for k in a.keys}
    filled = {group.get(m, m) for m in [*matched, *adapted]}
    missing = tuple(m for m in model if group.get(m, m) not in filled)
    rule_counts = applied.rule_counts if rules is not None else ()
    return Suggestion(
        rules=rules,
        matched_before=before,
        matched_after=len(matched),
        model_keys=len(model),
        missing_after=missing,
        unexpected_after=tuple(k for k in result if model.get(k) != result[k] and k not in adapted),
        ambiguities=tuple(ambiguities),
        notes=tuple(notes),
        alternatives=alternatives,
        allow_missing=(
            covering_globs(missing, list(model)) if rules is not None or adapters else ()
        ),
        adapters=adapters,
        rule_counts=rule_counts,
    )


def suggest_after(
    given: Rules,
    checkpoint: Mapping[str, Shape] | Mapping[str, Sequence[int]],
    model: Mapping[str, Shape] | Mapping[str, Sequence[int]],
    *,
    ties: Mapping[str, str] | None = None,
) -> Suggestion:
    """:func:`suggest`, starting from the rules the user gave: the result's ``rules`` are the
    whole set (``given`` and what is suggested on top of them), ready for one ``remap``.

    ``checkpoint`` holds the keys before ``given``. When the two cannot be written as one rule
    set (an ``add_prefix`` given, then renamed), the result holds only the added rules and a
    note says that they apply to the keys the given rules make.
    """
    if not given:
        return suggest(checkpoint, model, ties=ties)
    ckpt = {k: tuple(v) for k, v in checkpoint.items()}
    first = given.plan(ckpt)
    renamed = {new: ckpt[old] for old, new in first.renames}
    then = suggest(renamed, model, ties=ties)
    if then.rules is None:
        if then.alternatives or then.ambiguities:
            return then
        notes = (*then.notes, "the rules given already make the most keys match")
        return dataclasses.replace(then, rules=given, notes=notes, rule_counts=first.rule_counts)
    whole = _compose(given, then.rules, ckpt)
    if whole is None:
        note = (
            "the suggested rules apply to the keys your rules make (run remap with yours first); "
            "they do not combine into one rule set"
        )
        return dataclasses.replace(then, notes=(*then.notes, note))
    return dataclasses.replace(then, rules=whole, rule_counts=whole.plan(ckpt).rule_counts)


def _compose(first: Rules, then: Rules, ckpt: Mapping[str, Shape]) -> Rules | None:
    """One rule set doing ``first`` then ``then`` to these keys, or None when none is found."""
    p1 = first.plan(ckpt)
    p2 = then.plan([new for _, new in p1.renames]).mapping
    expected = {old: p2[new] for old, new in p1.renames if new in p2}
    kept = [old for old, _ in p1.renames]
    gone = [old for old, new in p1.renames if new not in p2]
    add = then.add_prefix + first.add_prefix if first.add_prefix else then.add_prefix
    try:
        whole = Rules(
            keep=first.keep,
            drop=first.drop + covering_globs(gone, kept),
            strip_prefix=first.strip_prefix + then.strip_prefix,
            replace=first.replace + then.replace,
            regex=first.regex + then.regex,
            add_prefix=add,
        )
        return whole if whole.plan(ckpt).mapping == expected else None
    except RuleError:
        return None
