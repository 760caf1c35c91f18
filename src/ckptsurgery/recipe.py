"""Recipes: a whole surgery written down once in TOML, and run with ``ckptsurgery apply``.

::

    # ckptsurgery apply moco_to_resnet50.toml
    [[source]]                    # one or more; each with its own key and rules, as in remap
    path = "moco_v2.pth.tar"      # relative to this file's folder
    key = "state_dict"
    keep = ["module.encoder_q.*"]
    drop = ["module.encoder_q.fc.*"]
    strip_prefix = ["module.encoder_q."]

    [[source]]
    path = "head.safetensors"

    [merge]                       # optional
    on_conflict = "error"         # error | first | last
    average = false
    weights = []

    [target]                      # optional gate, as remap --model
    model = "torchvision:resnet50"
    model_args = { num_classes = 10 }
    allow_missing = []
    allow_unexpected = []
    drop_mismatched = false

    [output]
    path = "resnet50_moco.safetensors"
    format = "safetensors"        # optional; else from the extension
    # max_shard_size = "5GB"      # optional: path is then a folder of safetensors shards
                                  # and model.safetensors.index.json

A recipe is checked whole before any checkpoint is read: every malformed field gets its own
message, naming the field, its line and the allowed values, and they are reported together.
Trust (``--allow-global``, ``--unsafe-pickle``) is never read from a recipe, only given on the
command line: a recipe is a file people share.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptsurgery._types import PathLike
from ckptsurgery.errors import CheckpointError, RuleError
from ckptsurgery.merge import (
    ON_CONFLICT,
    MergeResult,
    SourceSpec,
    average_files,
    merge_files,
)
from ckptsurgery.rules import RULE_FIELDS, Rules

if TYPE_CHECKING:
    from ckptsurgery.surgery import Gate

__all__ = [
    "Recipe",
    "RecipeError",
    "RecipeResult",
    "Target",
    "apply_recipe",
    "load_recipe",
    "parse_recipe",
    "recipe_toml",
]

TABLES = ("source", "merge", "target", "output")
SOURCE_FIELDS = ("path", "key", *RULE_FIELDS)
MERGE_FIELDS = ("on_conflict", "average", "weights")
TARGET_FIELDS = ("model", "model_args", "allow_missing", "allow_unexpected", "drop_mismatched")
OUTPUT_FIELDS = ("path", "format", "max_shard_size")
FORMATS = ("safetensors", "torch")


class RecipeError(RuleError):
    """A recipe is malformed; ``problems`` lists every one found, each naming its field."""

    def __init__(self, message: str, *, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


@dataclass(frozen=True)
class Target:
    """A recipe's ``[target]``: the gate the result must pass before it is written."""

    model: str
    model_args: Mapping[str, Any] = field(default_factory=dict)
    allow_missing: tuple[str, ...] = ()
    allow_unexpected: tuple[str, ...] = ()
    drop_mismatched: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_args": dict(self.model_args),
            "allow_missing": list(self.allow_missing),
            "allow_unexpected": list(self.allow_unexpected),
            "drop_mismatched": self.drop_mismatched,
        }


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe; paths are resolved against the recipe's folder."""

    path: Path  # the recipe file
    sources: tuple[SourceSpec, ...]
    output: Path
    format: str | None = None
    on_conflict: str = "error"
    average: bool = False
    weights: tuple[float, ...] = ()
    target: Target | None = None
    sha256: str = ""  # of the recipe file's bytes
    max_shard_size: int | None = None  # bytes; the output is then a folder of shards


@dataclass(frozen=True)
class RecipeResult:
    recipe: Recipe
    result: MergeResult
    model_note: str | None = None  # how the target model was built, when it needed saying


# --- reading --------------------------------------------------------------------------------


def load_recipe(path: PathLike) -> Recipe:
    """Read and check the recipe at ``path`` (raises :class:`RecipeError` naming every fault)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"recipe {str(p)!r} does not exist") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe {str(p)!r} is a directory; give the .toml file") from None
    except OSError as e:
        raise RecipeError(f"recipe {str(p)!r} cannot be read: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {str(p)!r} is not UTF-8 text") from None
    recipe = parse_recipe(text, base=p.parent, name=str(p))
    return replace(recipe, path=p, sha256=hashlib.sha256(data).hexdigest())


def parse_recipe(text: str, *, base: PathLike = ".", name: str = "recipe") -> Recipe:
    """A recipe from TOML ``text``; relative paths are taken from ``base``."""
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{name} is not valid TOML: {e}") from None
    checker = _Checker(name, _field_lines(text))
    recipe = checker.recipe(data, Path(base))
    checker.raise_if_any()
    assert recipe is not None
    return recipe


class _Checker:
    """Collects every problem of a recipe, each located by table, field and line."""

    def __init__(self, name: str, lines: dict[tuple[str, int | None, str], int]) -> None:
        self.name = name
        self.lines = lines
        self.problems: list[str] = []
        self._lines: list[float] = []  # each problem's line, to report them in file order

    def problem(self, table: str, index: int | None, fld: str, message: str) -> None:
        line = self.lines.get((table, index, fld)) or self.lines.get((table, index, ""))
        self.located(line, f"{_label(table, index)}{' ' + fld if fld else ''}: {message}")

    def located(self, line: int | None, message: str) -> None:
        self.problems.append(f"line {line}: {message}" if line else message)
        self._lines.append(line if line else math.inf)

    def raise_if_any(self) -> None:
        if not self.problems:
            return
        order = sorted(range(len(self.problems)), key=lambda i: self._lines[i])
        self.problems = [self.problems[i] for i in order]
        if len(self.problems) == 1:
            raise RecipeError(f"{self.name}: {self.problems[0]}", problems=self.problems)
        raise RecipeError(
            f"{self.name}: {len(self.problems)} problems: " + "; ".join(self.problems),
            problems=self.problems,
        )

    def unknown(
        self, table: str, index: int | None, data: Mapping[str, Any], allowed: Sequence[str]
    ) -> None:
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.problem(
                    table, index, key, f"unknown field{hint}; allowed: {', '.join(allowed)}"
                )

    # -- tables ---------------------------------------------------------------------------

    def recipe(self, data: Mapping[str, Any], base: Path) -> Recipe | None:
        for key, value in data.items():
            if key not in TABLES:
                close = difflib.get_close_matches(key, TABLES, n=1)
                hint = f" (did you mean [{close[0]}]?)" if close else ""
                what = (
                    f"[{key}]: unknown table"
                    if isinstance(value, dict | list)
                    else (f"{key}: unknown top-level field")
                )
                self.located(
                    self.lines.get((key, None, "")),
                    f"{what}{hint}; allowed: [[source]], [merge], [target], [output]",
                )
        raw_sources = data.get("source")
        sources = self.sources(raw_sources, base)
        n_sources = len(raw_sources) if isinstance(raw_sources, list) else None
        merge = self.merge(data.get("merge"), n_sources)
        target = self.target(data.get("target"))
        output, fmt, max_shard_size = self.output(data.get("output"), base)
        if self.problems or sources is None or output is None or merge is None:
            return None
        on_conflict, average, weights = merge
        return Recipe(
            path=Path(self.name),
            sources=tuple(sources),
            output=output,
            format=fmt,
            on_conflict=on_conflict,
            average=average,
            weights=weights,
            target=target,
            max_shard_size=max_shard_size,
        )

    def sources(self, value: Any, base: Path) -> list[SourceSpec] | None:
        if value is None:
            self.problem(
                "source",
                None,
                "",
                'missing: a recipe needs at least one [[source]] with path = "..."',
            )
            return None
        if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
            self.problem(
                "source",
                None,
                "",
                "must be written [[source]] (double brackets: a list of sources), each a table "
                'with path = "..."',
            )
            return None
        out = []
        for i, table in enumerate(value):
            spec = self.source(i, table, base)
            if spec is not None:
                out.append(spec)
        return out if len(out) == len(value) else None

    def source(self, i: int, table: Mapping[str, Any], base: Path) -> SourceSpec | None:
        bad = len(self.problems)
        self.unknown("source", i, table, SOURCE_FIELDS)
        path = table.get("path")
        resolved = None
        if path is None:
            self.problem(
                "source",
                i,
                "",
                'missing field path: the checkpoint to read, e.g. path = "model.pth"',
            )
        elif not isinstance(path, str) or not path:
            self.problem("source", i, "path", f"must be a file name in quotes, got {_show(path)}")
        else:
            resolved = _resolve(base, path)
            if not resolved.exists():
                self.problem(
                    "source",
                    i,
                    "path",
                    f"{path!r} does not exist (looked for {os.path.abspath(resolved)!r}; paths "
                    "are relative to the recipe's folder)",
                )
            elif resolved.is_dir():
                self.problem("source", i, "path", f"{path!r} is a directory; name the file")
        key = table.get("key")
        if key is not None and (not isinstance(key, str) or not key):
            self.problem(
                "source",
                i,
                "key",
                f'must be a slash-separated path such as "state_dict", got {_show(key)}',
            )
        rules: dict[str, Any] = {}
        for fld in RULE_FIELDS:
            if fld in table:
                value = table[fld]
                message = _rule_type_problem(fld, value)
                if message is None:
                    try:
                        Rules.from_dict({fld: value})
                    except RuleError as e:
                        message = str(e).removeprefix("rules: ")
                if message is None:
                    rules[fld] = value
                else:
                    self.problem("source", i, fld, message)
        if len(self.problems) > bad or resolved is None:
            return None
        return SourceSpec(resolved, key=key, rules=Rules.from_dict(rules))

    def merge(
        self, value: Any, n_sources: int | None
    ) -> tuple[str, bool, tuple[float, ...]] | None:
        if value is None:
            return "error", False, ()
        if not isinstance(value, dict):
            self.problem("merge", None, "", "must be a table: [merge] on a line of its own")
            return None
        bad = len(self.problems)
        self.unknown("merge", None, value, MERGE_FIELDS)
        on_conflict = value.get("on_conflict", "error")
        if on_conflict not in ON_CONFLICT:
            self.problem(
                "merge",
                None,
                "on_conflict",
                f"{_show(on_conflict)} is not allowed; use one of {', '.join(map(repr, ON_CONFLICT))}",
            )
        average = value.get("average", False)
        if not isinstance(average, bool):
            self.problem("merge", None, "average", f"must be true or false, got {_show(average)}")
        elif average and "on_conflict" in value:
            self.problem(
                "merge",
                None,
                "on_conflict",
                "does not apply with average = true (averaging needs the same keys in every "
                "source); remove it",
            )
        weights = value.get("weights", [])
        if not isinstance(weights, list) or not all(
            isinstance(w, int | float) and not isinstance(w, bool) for w in weights
        ):
            self.problem(
                "merge",
                None,
                "weights",
                f"must be a list of numbers, e.g. [0.5, 0.3, 0.2], got {_show(weights)}",
            )
            weights = []
        elif any(not math.isfinite(w) or w <= 0 for w in weights):
            self.problem("merge", None, "weights", f"must all be positive numbers, got {weights}")
        elif weights and average is not True:
            self.problem("merge", None, "weights", "apply only with average = true")
        elif weights and n_sources is not None and len(weights) != n_sources:
            self.problem(
                "merge",
                None,
                "weights",
                f"{len(weights)} weights for {n_sources} [[source]] blocks; give one per source, "
                "in order (or [] for equal weights)",
            )
        if average is True and n_sources is not None and n_sources < 2:
            self.problem("merge", None, "average", "needs at least two [[source]] blocks")
        if len(self.problems) > bad:
            return None
        return str(on_conflict), bool(average), tuple(float(w) for w in weights)

    def target(self, value: Any) -> Target | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.problem("target", None, "", "must be a table: [target] on a line of its own")
            return None
        bad = len(self.problems)
        self.unknown("target", None, value, TARGET_FIELDS)
        model = value.get("model")
        if model is None:
            self.problem(
                "target",
                None,
                "",
                'missing field model: a model SPEC, e.g. model = "torchvision:resnet50"',
            )
        elif not isinstance(model, str) or not model.strip():
            self.problem(
                "target",
                None,
                "model",
                f'must be a model SPEC such as "torchvision:resnet50", got {_show(model)}',
            )
        model_args = value.get("model_args", {})
        if not isinstance(model_args, dict):
            self.problem(
                "target",
                None,
                "model_args",
                f"must be a table such as {{ num_classes = 10 }}, got {_show(model_args)}",
            )
        else:
            for k in model_args:
                if not k.isidentifier():
                    self.problem(
                        "target", None, "model_args", f"{k!r} is not a Python argument name"
                    )
        globs: dict[str, tuple[str, ...]] = {}
        for fld in ("allow_missing", "allow_unexpected"):
            raw = value.get(fld, [])
            raw = [raw] if isinstance(raw, str) else raw
            if not isinstance(raw, list) or not all(isinstance(g, str) and g for g in raw):
                self.problem(
                    "target",
                    None,
                    fld,
                    f'must be a list of globs such as ["fc.*"], got {_show(value.get(fld))}',
                )
            else:
                globs[fld] = tuple(raw)
        drop = value.get("drop_mismatched", False)
        if not isinstance(drop, bool):
            self.problem(
                "target", None, "drop_mismatched", f"must be true or false, got {_show(drop)}"
            )
        if len(self.problems) > bad:
            return None
        return Target(
            model=str(model),
            model_args=dict(model_args),
            allow_missing=globs["allow_missing"],
            allow_unexpected=globs["allow_unexpected"],
            drop_mismatched=bool(drop),
        )

    def output(self, value: Any, base: Path) -> tuple[Path | None, str | None, int | None]:
        if value is None:
            self.problem("output", None, "", 'missing: add [output] with path = "OUT.safetensors"')
            return None, None, None
        if not isinstance(value, dict):
            self.problem("output", None, "", "must be a table: [output] on a line of its own")
            return None, None, None
        bad = len(self.problems)
        self.unknown("output", None, value, OUTPUT_FIELDS)
        fmt = value.get("format")
        if fmt is not None and fmt not in FORMATS:
            self.problem(
                "output",
                None,
                "format",
                f"{_show(fmt)} is not allowed; use one of {', '.join(map(repr, FORMATS))}",
            )
            fmt = None
        max_shard_size = self.shard_size(value.get("max_shard_size"), fmt)
        path = value.get("path")
        if path is None:
            self.problem(
                "output",
                None,
                "",
                'missing field path: the file to write, e.g. path = "out.safetensors"',
            )
        elif not isinstance(path, str) or not path:
            self.problem(
                "output", None, "path", f"must be a file name in quotes, got {_show(path)}"
            )
        elif fmt is None and "format" not in value and "max_shard_size" not in value:
            from ckptsurgery.io import output_format

            try:
                output_format(path, None)
            except CheckpointError:
                self.problem(
                    "output",
                    None,
                    "path",
                    f"cannot tell the format from {path!r}; use a .safetensors, .pt, .pth or .bin "
                    'name, or add format = "safetensors" or "torch"',
                )
        if len(self.problems) > bad or not isinstance(path, str):
            return None, None, None
        return _resolve(base, path), fmt, max_shard_size

    def shard_size(self, value: Any, fmt: str | None) -> int | None:
        """``[output] max_shard_size``: "5GB", "2GiB" or a number of bytes."""
        if value is None:
            return None
        from ckptsurgery.io import parse_size

        if isinstance(value, bool) or not isinstance(value, str | int):
            message = f'must be a size such as "5GB" or a number of bytes, got {_show(value)}'
            self.problem("output", None, "max_shard_size", message)
            return None
        try:
            size = parse_size(value)
        except CheckpointError:
            message = f'{value!r} is not a size; use e.g. "5GB", "500MB", "2GiB" or bytes'
            self.problem("output", None, "max_shard_size", message)
            return None
        if fmt == "torch":
            message = 'writes safetensors shards; remove format = "torch" or this field'
            self.problem("output", None, "max_shard_size", message)
            return None
        return size


def _label(table: str, index: int | None) -> str:
    if table == "source":
        return "[[source]]" if index is None else f"[[source]] #{index + 1}"
    return f"[{table}]"


def _resolve(base: Path, path: str) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else base / p


def _show(value: Any) -> str:
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    text = _toml_value(value) if _tomlable(value) else repr(value)
    return f"{kind} ({text})"


def _rule_type_problem(fld: str, value: Any) -> str | None:
    """The type error of one rule field, phrased for a TOML author, or None."""
    if fld in ("keep", "drop", "strip_prefix"):
        if isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            return None
        example = {"keep": '["encoder.*"]', "drop": '["fc.*"]', "strip_prefix": '["module."]'}[fld]
        return f"must be a list of strings such as {example}, got {_show(value)}"
    if fld in ("replace", "regex"):
        ok = isinstance(value, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
            for p in value
        )
        if ok:
            return None
        return (
            f'must be a list of ["old", "new"] string pairs such as [["{"bn" if fld == "replace" else "^blocks"}", '
            f'"{"norm" if fld == "replace" else "layers"}"]], got {_show(value)}'
        )
    if fld == "add_prefix" and not isinstance(value, str):
        return f'must be a string such as "model.", got {_show(value)}'
    return None


_TABLE_HEADER = re.compile(r"^\[\s*([^\[\]]+?)\s*\]")
_ARRAY_HEADER = re.compile(r"^\[\[\s*([^\[\]]+?)\s*\]\]")
_KEY = re.compile(r"""^("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*=""")


def _field_lines(text: str) -> dict[tuple[str, int | None, str], int]:
    """(table, array index, field) -> the line it is on; "" for the table header itself.

    tomllib gives no positions for values, so the lines are found by reading the text: good
    for the plain layout recipes use; a field it cannot place is reported without a line.
    """
    lines: dict[tuple[str, int | None, str], int] = {}
    counts: dict[str, int] = {}
    table, index = "", None
    for number, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if m := _ARRAY_HEADER.match(s):
            table = m[1].strip("\"'")
            counts[table] = counts.get(table, -1) + 1
            index = counts[table]
            lines.setdefault((table, index, ""), number)
            lines.setdefault((table, None, ""), number)
        elif m := _TABLE_HEADER.match(s):
            table, index = m[1].strip("\"'"), None
            lines.setdefault((table, None, ""), number)
        elif m := _KEY.match(s):
            key = m[1].strip("\"'")
            if table:
                lines.setdefault((table, index, key), number)
            else:  # a top-level key: it is its own "table" in messages
                lines.setdefault((key, None, ""), number)
    return lines


# --- running --------------------------------------------------------------------------------


def apply_recipe(
    path: PathLike,
    *,
    dry_run: bool = False,
    force: bool = False,
    key: str | None = None,
    allow_globals: tuple[str, ...] | list[str] = (),
    unsafe_pickle: bool = False,
    verify: bool = True,
    max_shard_size: int | str | None = None,
) -> RecipeResult:
    """Run the recipe at ``path``: read every source through its rules, merge (or average),
    gate against the target, and write the output with its provenance.

    ``key`` is the state dict path for sources whose ``[[source]]`` gives none. A dry run
    plans everything (the gate included) and writes nothing. Applying a recipe twice to the
    same inputs writes byte-identical files (the provenance holds no time).
    ``max_shard_size`` overrides the recipe's ``[output] max_shard_size``.
    """
    recipe = load_recipe(path)
    sources = [s if s.key is not None else SourceSpec(s.path, key, s.rules) for s in recipe.sources]
    gate, note = _gate(recipe.target)
    provenance: dict[str, Any] = {"recipe": {"name": recipe.path.name, "sha256": recipe.sha256}}
    if recipe.target is not None:
        provenance["target"] = recipe.target.to_dict()  # with its model_args
    common: dict[str, Any] = {
        "format": recipe.format,
        "force": force,
        "dry_run": dry_run,
        "gate": gate,
        "allow_globals": allow_globals,
        "unsafe_pickle": unsafe_pickle,
        "provenance": provenance,
        "verify": verify,
        "max_shard_size": recipe.max_shard_size if max_shard_size is None else max_shard_size,
    }
    if recipe.average:
        result = average_files(sources, recipe.output, weights=recipe.weights or None, **common)
    else:
        result = merge_files(sources, recipe.output, on_conflict=recipe.on_conflict, **common)
    return RecipeResult(recipe, result, note)


def _gate(target: Target | None) -> tuple[Gate | None, str | None]:
    if target is None:
        return None, None
    from ckptsurgery.models import build_model
    from ckptsurgery.surgery import Gate

    built = build_model(target.model, target.model_args)
    gate = Gate(
        built,
        allow_missing=target.allow_missing,
        allow_unexpected=target.allow_unexpected,
        drop_mismatched=target.drop_mismatched,
    )
    return gate, built.note


# --- writing --------------------------------------------------------------------------------


def recipe_toml(
    sources: Sequence[tuple[PathLike, str | None, Rules]],
    target: Target | None,
    output: PathLike,
    *,
    recipe_dir: PathLike | None = None,
    on_conflict: str = "error",
) -> str:
    """A recipe that :func:`apply_recipe` accepts as it is: one ``[[source]]`` per
    ``(path, key, rules)``, the ``[target]`` gate when given, and ``[output]``.

    Paths are written as given; with ``recipe_dir`` (the folder the recipe will be saved in),
    paths relative to the current folder are rewritten relative to it, as ``apply`` reads them.
    """

    def where(p: PathLike) -> str:
        if recipe_dir is None or Path(p).is_absolute():
            return str(p)
        return os.path.relpath(os.path.abspath(p), os.path.abspath(recipe_dir))

    first = os.path.basename(str(sources[0][0])) if sources else "SRC"
    lines = [f"# ckptsurgery apply RECIPE.toml   (made for {first})", ""]
    for path, key, rules in sources:
        lines.append("[[source]]")
        lines.append(f"path = {_toml_value(where(path))}")
        if key:
            lines.append(f"key = {_toml_value(key)}")
        for name, value in rules.to_dict().items():
            lines.append(f"{name} = {_toml_value(value)}")
        lines.append("")
    if on_conflict != "error":
        lines += ["[merge]", f"on_conflict = {_toml_value(on_conflict)}", ""]
    if target is not None:
        lines.append("[target]")
        lines.append(f"model = {_toml_value(target.model)}")
        if target.model_args:
            for k, v in target.model_args.items():
                if not _tomlable(v):
                    raise RecipeError(
                        f"model argument {k}={v!r} cannot be written in TOML (no None, no "
                        "objects); leave it out or set it in the recipe by hand"
                    )
            lines.append(f"model_args = {_toml_value(dict(target.model_args))}")
        lines.append(f"allow_missing = {_toml_value(list(target.allow_missing))}")
        lines.append(f"allow_unexpected = {_toml_value(list(target.allow_unexpected))}")
        lines.append(f"drop_mismatched = {_toml_value(target.drop_mismatched)}")
        lines.append("")
    lines += ["[output]", f"path = {_toml_value(where(output))}", ""]
    return "\n".join(lines)


def _tomlable(value: Any) -> bool:
    if isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return True
    if isinstance(value, list | tuple):
        return all(_tomlable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _tomlable(v) for k, v in value.items())
    return False


def _toml_value(value: Any) -> str:
    """``value`` as a TOML value (inline tables and arrays); see :func:`_tomlable`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
