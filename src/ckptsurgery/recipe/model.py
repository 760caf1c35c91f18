"""A parsed recipe, its parts and its error; the tables and fields a recipe may hold."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptsurgery.errors import RuleError
from ckptsurgery.rules import RULE_FIELDS

if TYPE_CHECKING:
    from ckptsurgery.merge import MergeResult, SourceSpec
    from ckptsurgery.plan.adapt import Adapter
    from ckptsurgery.plan.lora import LoraAdapter
    from ckptsurgery.plan.model import Op

TABLES = ("source", "adapt", "lora", "merge", "target", "output")
SOURCE_FIELDS = ("path", "key", *RULE_FIELDS)
MERGE_FIELDS = (
    "on_conflict",
    "average",
    "weights",
    "method",
    "base",
    "density",
    "lambda",
    "seed",
    "normalize",
)
TARGET_FIELDS = ("model", "model_args", "allow_missing", "allow_unexpected", "drop_mismatched")
OUTPUT_FIELDS = ("path", "format", "max_shard_size", "dtype", "keep_dtype")
FORMATS = ("safetensors", "torch")
DTYPES = ("float32", "float16", "bfloat16")  # [output] dtype


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
class MethodMerge:
    """A recipe's method merge (``[merge] method = "ties"``): the checked op, with every
    parameter, and which ``[[source]]`` is the base (the others are the models, in order)."""

    op: Op
    base: int


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
    dtype: str | None = None  # one of DTYPES: the dtype to write the tensors in
    keep_dtype: tuple[str, ...] = ()  # globs of the tensors that keep their dtype
    adapters: tuple[Adapter, ...] = ()  # [[adapt]]: shape adapters on the output names
    method: MethodMerge | None = None  # [merge] method = ...: fine-tunes merged into a base
    lora: tuple[LoraAdapter, ...] = ()  # [[lora]]: a peft LoRA adapter folded into the output


@dataclass(frozen=True)
class RecipeResult:
    recipe: Recipe
    result: MergeResult
    model_note: str | None = None  # how the target model was built, when it needed saying
