"""Renames as data: a frozen :class:`Rules` value and the :class:`KeyPlan` it makes of key names.

The rules run in one fixed order on every key (the order of the contract):

1. ``keep``: when any glob is given, only keys matching at least one are kept;
2. ``drop``: keys matching any glob are removed;
3. ``strip_prefix``: in the order given, a key starting with the prefix loses it;
4. ``replace``: in order, plain substring replacement;
5. ``regex``: in order, ``re.sub`` on the key;
6. ``add_prefix``: prepended to every key.

Globs are ``fnmatch``-style on the whole dotted key (``*`` also matches dots) and are matched
against the original key. A plan only names keys: no tensor is touched until it is written.

:meth:`Rules.apply` takes a state dict (a new dict comes back), an open
:class:`~ckptsurgery.io.Checkpoint` or a path (a renamed view of its header comes back; tensors
are read when asked for). A rule that touches no key is an :class:`UnusedPatternWarning`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

from ckptsurgery.errors import KeyCollisionError, RuleError

if TYPE_CHECKING:
    from ckptsurgery.io.base import Checkpoint

V = TypeVar("V")


class UnusedPatternWarning(UserWarning):
    """A rule, or an ``allow_missing`` / ``allow_unexpected`` glob, matched no key: a typo, or a
    checkpoint other than the one the rules were written for."""


RULE_FIELDS = ("keep", "drop", "strip_prefix", "replace", "regex", "add_prefix")


@dataclass(frozen=True)
class Rules:
    """A surgery's key rules; built the same way from CLI flags, a TOML file or Python."""

    keep: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    strip_prefix: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()
    regex: tuple[tuple[str, str], ...] = ()
    add_prefix: str = ""
    _compiled: tuple[re.Pattern[str], ...] = field(
        default=(), init=False, repr=False, compare=False
    )

    def __init__(
        self,
        *,
        keep: Iterable[str] = (),
        drop: Iterable[str] = (),
        strip_prefix: Iterable[str] = (),
        replace: Iterable[Sequence[str]] = (),
        regex: Iterable[Sequence[str]] = (),
        add_prefix: str = "",
    ) -> None:
        # Accept lists and a single string where a tuple is meant: Rules(keep="fc.*") is a
        # common slip that would otherwise keep the keys matching "f", "c", "." or "*".
        set_ = object.__setattr__
        set_(self, "keep", _strings("keep", keep))
        set_(self, "drop", _strings("drop", drop))
        set_(self, "strip_prefix", _strings("strip_prefix", strip_prefix))
        set_(self, "replace", _pairs("replace", replace))
        set_(self, "regex", _pairs("regex", regex))
        if not isinstance(add_prefix, str):
            raise RuleError(f"add_prefix must be a string, got {type(add_prefix).__name__}")
        set_(self, "add_prefix", add_prefix)
        for p in self.strip_prefix:
            if not p:
                raise RuleError("strip_prefix: an empty prefix strips nothing; remove it")
        for old, _ in self.replace:
            if not old:
                raise RuleError("replace: the text to replace must not be empty")
        compiled = []
        for pattern, repl in self.regex:
            try:
                compiled.append(re.compile(pattern))
            except re.error as e:
                raise RuleError(f"regex {pattern!r} is not a valid regular expression: {e}") from e
            # re only parses the replacement when it first substitutes; parse it now so that a
            # bad group reference is reported before any checkpoint is read.
            try:
                compiled[-1].sub(repl, "")
            except (re.error, IndexError) as e:
                raise RuleError(
                    f"regex {pattern!r}: the replacement {repl!r} is invalid ({e}); refer to "
                    r"groups the pattern has, as \1 or \g<name>"
                ) from None
        set_(self, "_compiled", tuple(compiled))

    def __repr__(self) -> str:
        """Only the rules that are set, as the call that builds them: ``Rules(add_prefix='bert.')``."""
        return f"Rules({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    # -- construction and serialisation ---------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "rules") -> Rules:
        """Rules from a mapping with the recipe's ``[[source]]`` rule keys."""
        unknown = sorted(set(data) - set(RULE_FIELDS))
        if unknown:
            raise RuleError(
                f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(RULE_FIELDS)}"
            )
        kwargs: dict[str, Any] = {}
        for name in ("keep", "drop", "strip_prefix"):
            if name in data:
                value = data[name]
                kwargs[name] = [value] if isinstance(value, str) else value
        for name in ("replace", "regex"):
            if name in data:
                kwargs[name] = data[name]
        if "add_prefix" in data:
            kwargs["add_prefix"] = data["add_prefix"]
        try:
            return cls(**kwargs)
        except RuleError as e:
            raise RuleError(f"{where}: {e}") from None

    @classmethod
    def from_toml(cls, path: str | Path) -> tuple[Rules, str | None]:
        """Rules from a TOML file (the keys of a recipe's ``[[source]]``), and its ``key``."""
        import tomllib

        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RuleError(f"rules file {str(p)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RuleError(f"rules file {str(p)!r} cannot be read: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise RuleError(f"rules file {str(p)!r} is not valid TOML: {e}") from None
        key = data.pop("key", None)
        if key is not None and not isinstance(key, str):
            raise RuleError(f"{p}: 'key' must be a string such as \"state_dict\"")
        if "path" in data:
            raise RuleError(
                f"{p}: 'path' belongs in a recipe (ckptsurgery apply); a rules file holds only "
                f"key and {', '.join(RULE_FIELDS)}"
            )
        unknown = sorted(set(data) - set(RULE_FIELDS))
        if unknown:  # checked here so that the message lists `key`, which only a file has
            raise RuleError(
                f"{p}: unknown field {unknown[0]!r}; allowed: key, {', '.join(RULE_FIELDS)}"
            )
        return cls.from_dict(data, where=str(p)), key

    def to_dict(self) -> dict[str, Any]:
        """Only the rules that are set, as plain JSON/TOML-ready values."""
        out: dict[str, Any] = {}
        for name in RULE_FIELDS:
            value = getattr(self, name)
            if value:
                out[name] = (
                    [list(v) for v in value]
                    if name in ("replace", "regex")
                    else (list(value) if isinstance(value, tuple) else value)
                )
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)

    def __or__(self, other: object) -> Rules:
        """These rules followed by ``other``'s in each list (a rules file, then CLI flags)."""
        if not isinstance(other, Rules):
            return NotImplemented
        if self.add_prefix and other.add_prefix and self.add_prefix != other.add_prefix:
            raise RuleError(
                f"add_prefix given twice ({self.add_prefix!r} and {other.add_prefix!r}); keep one"
            )
        return Rules(
            keep=self.keep + other.keep,
            drop=self.drop + other.drop,
            strip_prefix=self.strip_prefix + other.strip_prefix,
            replace=self.replace + other.replace,
            regex=self.regex + other.regex,
            add_prefix=self.add_prefix or other.add_prefix,
        )

    def __bool__(self) -> bool:
        return bool(self.to_dict())

    def describe(self) -> list[str]:
        """Each rule as the CLI flag that expresses it, in the order they apply.

        Arguments are shell-quoted where needed (``--keep 'fc.*'``, ``--replace .bn ''``), so
        that a rule can be pasted back into a command line as printed.
        """
        q = shlex.quote
        out = [f"--keep {q(g)}" for g in self.keep]
        out += [f"--drop {q(g)}" for g in self.drop]
        out += [f"--strip-prefix {q(p)}" for p in self.strip_prefix]
        out += [f"--replace {q(a)} {q(b)}" for a, b in self.replace]
        out += [f"--regex {q(a)} {q(b)}" for a, b in self.regex]
        if self.add_prefix:
            out.append(f"--add-prefix {q(self.add_prefix)}")
        return out

    # -- application ----------------------------------------------------------------------

    def plan(self, keys: Iterable[str]) -> KeyPlan:
        """What these rules do to ``keys``: old -> new names, dropped keys, per-rule counts.

        Raises :class:`KeyCollisionError` when two keys end up with the same name.
        """
        keys = list(keys)
        counts = [0] * len(self.describe())
        i_drop = len(self.keep)
        i_strip = i_drop + len(self.drop)
        i_replace = i_strip + len(self.strip_prefix)
        i_regex = i_replace + len(self.replace)
        i_add = i_regex + len(self.regex)

        renames: list[tuple[str, str]] = []
        dropped: list[str] = []
        for key in keys:
            if self.keep:
                hits = [i for i, g in enumerate(self.keep) if fnmatchcase(key, g)]
                for i in hits:
                    counts[i] += 1
                if not hits:
                    dropped.append(key)
                    continue
            hits = [i for i, g in enumerate(self.drop) if fnmatchcase(key, g)]
            for i in hits:
                counts[i_drop + i] += 1
            if hits:
                dropped.append(key)
                continue
            new = key
            for i, prefix in enumerate(self.strip_prefix):
                if new.startswith(prefix):
                    new = new[len(prefix) :]
                    counts[i_strip + i] += 1
            for i, (old, repl) in enumerate(self.replace):
                if old in new:
                    new = new.replace(old, repl)
                    counts[i_replace + i] += 1
            for i, (pattern, (_, repl)) in enumerate(zip(self._compiled, self.regex, strict=True)):
                try:
                    new, n = pattern.subn(repl, new)
                except (re.error, IndexError) as e:
                    raise RuleError(f"regex {pattern.pattern!r} -> {repl!r}: {e}") from None
                if n:
                    counts[i_regex + i] += 1
            if self.add_prefix:
                new = self.add_prefix + new
                counts[i_add] += 1
            if not new and key:  # a key that is empty already passes through unchanged
                raise RuleError(f"the rules rename {key!r} to an empty name")
            renames.append((key, new))

        by_new: dict[str, list[str]] = {}
        for old, new in renames:
            by_new.setdefault(new, []).append(old)
        collisions = {new: tuple(olds) for new, olds in by_new.items() if len(olds) > 1}
        if collisions:
            shown = "; ".join(
                f"{' and '.join(repr(o) for o in olds)} -> {new!r}"
                for new, olds in list(collisions.items())[:5]
            )
            more = f" (and {len(collisions) - 5} more)" if len(collisions) > 5 else ""
            raise KeyCollisionError(
                f"the rules rename several keys to the same name: {shown}{more}; "
                "drop one of them or change the rules",
                collisions=collisions,
            )
        return KeyPlan(
            renames=tuple(renames),
            dropped=tuple(dropped),
            rule_counts=tuple(zip(self.describe(), counts, strict=True)),
        )

    @overload
    def apply(self, state_dict: Mapping[str, V]) -> dict[str, V]: ...

    @overload
    def apply(self, state_dict: Checkpoint | str | os.PathLike[str]) -> Checkpoint: ...

    def apply(
        self, state_dict: Mapping[str, V] | Checkpoint | str | os.PathLike[str]
    ) -> dict[str, V] | Checkpoint:
        """The rules applied; the input is left as it was.

        A state dict gives a new dict. An open :class:`~ckptsurgery.io.Checkpoint` gives a view
        of it under the new names, header only (``match`` on it still reads no tensor data;
        tensors are read from the source when asked for). A path is opened first (its only
        state dict; open it with ``open_checkpoint(path, key=...)`` to pick one) and the view
        closes it when closed (use it as a context manager). A rule that touches no key is an
        :class:`UnusedPatternWarning`.
        """
        if isinstance(state_dict, Mapping):
            plan = self.plan(state_dict)
            warn_unused(plan.unused_rules)
            return plan.apply(state_dict)
        from ckptsurgery.io.base import Checkpoint
        from ckptsurgery.io.renamed import RenamedCheckpoint

        if isinstance(state_dict, Checkpoint):
            plan = self.plan(state_dict.infos)
            warn_unused(plan.unused_rules)
            return RenamedCheckpoint(state_dict, plan.renames)
        if isinstance(state_dict, str | os.PathLike):
            from ckptsurgery.io.reader import open_checkpoint

            ckpt = open_checkpoint(state_dict)
            try:
                plan = self.plan(ckpt.infos)
            except BaseException:
                ckpt.close()
                raise
            warn_unused(plan.unused_rules)
            return RenamedCheckpoint(ckpt, plan.renames, owns=True)
        raise TypeError(
            "Rules.apply takes a state dict, an open Checkpoint or a path; "
            f"got {type(state_dict).__name__}"
        )


def warn_unused(rules: Iterable[str], *, stacklevel: int = 2) -> None:
    """One :class:`UnusedPatternWarning` per rule (as its CLI flag) that matched no key."""
    for rule in rules:
        warnings.warn(f"{rule} matched no key", UnusedPatternWarning, stacklevel=stacklevel + 1)


@dataclass(frozen=True)
class KeyPlan:
    """The effect of rules on a list of key names."""

    renames: tuple[tuple[str, str], ...]  # (old, new) for every kept key, in source order
    dropped: tuple[str, ...]
    rule_counts: tuple[tuple[str, int], ...]  # (rule as a CLI flag, keys it touched)

    @property
    def unused_rules(self) -> list[str]:
        return [rule for rule, n in self.rule_counts if n == 0]

    @property
    def renamed(self) -> list[tuple[str, str]]:
        return [(o, n) for o, n in self.renames if o != n]

    @property
    def mapping(self) -> dict[str, str]:
        return dict(self.renames)

    def apply(self, state_dict: Mapping[str, V]) -> dict[str, V]:
        return {new: state_dict[old] for old, new in self.renames}

    def without(self, new_names: Iterable[str], *, reason: str) -> KeyPlan:
        """This plan with the keys now called ``new_names`` dropped too (counted as ``reason``)."""
        gone = set(new_names)
        if not gone:
            return self
        return KeyPlan(
            renames=tuple((o, n) for o, n in self.renames if n not in gone),
            dropped=self.dropped + tuple(o for o, n in self.renames if n in gone),
            rule_counts=(*self.rule_counts, (reason, len(gone))),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "renames": [{"old": o, "new": n} for o, n in self.renames],
            "dropped": list(self.dropped),
            "rule_counts": [{"rule": r, "keys": n} for r, n in self.rule_counts],
        }


def _strings(name: str, value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    elif isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise RuleError(f"{name} must be a list of strings, got {value!r}")
    out = tuple(value)
    for v in out:
        if not isinstance(v, str):
            raise RuleError(f"{name} must be a list of strings, got {v!r}")
    return out


def _pairs(name: str, value: Iterable[Sequence[str]]) -> tuple[tuple[str, str], ...]:
    if isinstance(value, str | Mapping) or not isinstance(value, Iterable):
        raise RuleError(f"{name} must be a list of [old, new] string pairs, got {value!r}")
    out = []
    for pair in value:
        if (
            not isinstance(pair, Sequence)
            or isinstance(pair, str)
            or len(pair) != 2
            or not all(isinstance(x, str) for x in pair)
        ):
            raise RuleError(f"{name} must be a list of [old, new] string pairs, got {pair!r}")
        out.append((pair[0], pair[1]))
    return tuple(out)
