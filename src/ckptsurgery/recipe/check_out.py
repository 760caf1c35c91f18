"""Checking what a recipe makes: its ``[target]`` gate and its ``[output]``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ckptsurgery.errors import CheckpointError
from ckptsurgery.recipe.model import DTYPES, FORMATS, OUTPUT_FIELDS, TARGET_FIELDS, Target
from ckptsurgery.recipe.problems import Problems, resolve, show


def check_target(c: Problems, value: Any) -> Target | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        c.problem("target", None, "", "must be a table: [target] on a line of its own")
        return None
    bad = len(c.problems)
    c.unknown("target", None, value, TARGET_FIELDS)
    model = value.get("model")
    if model is None:
        c.problem(
            "target",
            None,
            "",
            'missing field model: a model SPEC, e.g. model = "torchvision:resnet50"',
        )
    elif not isinstance(model, str) or not model.strip():
        c.problem(
            "target",
            None,
            "model",
            f'must be a model SPEC such as "torchvision:resnet50", got {show(model)}',
        )
    model_args = value.get("model_args", {})
    if not isinstance(model_args, dict):
        c.problem(
            "target",
            None,
            "model_args",
            f"must be a table such as {{ num_classes = 10 }}, got {show(model_args)}",
        )
    else:
        for k in model_args:
            if not k.isidentifier():
                c.problem("target", None, "model_args", f"{k!r} is not a Python argument name")
    globs: dict[str, tuple[str, ...]] = {}
    for fld in ("allow_missing", "allow_unexpected"):
        raw = value.get(fld, [])
        raw = [raw] if isinstance(raw, str) else raw
        if not isinstance(raw, list) or not all(isinstance(g, str) and g for g in raw):
            c.problem(
                "target",
                None,
                fld,
                f'must be a list of globs such as ["fc.*"], got {show(value.get(fld))}',
            )
        else:
            globs[fld] = tuple(raw)
    drop = value.get("drop_mismatched", False)
    if not isinstance(drop, bool):
        c.problem("target", None, "drop_mismatched", f"must be true or false, got {show(drop)}")
    if len(c.problems) > bad:
        return None
    return Target(
        model=str(model),
        model_args=dict(model_args),
        allow_missing=globs["allow_missing"],
        allow_unexpected=globs["allow_unexpected"],
        drop_mismatched=bool(drop),
    )


class Output(NamedTuple):
    """A checked ``[output]``: the :class:`~ckptsurgery.recipe.Recipe` fields it gives."""

    output: Path
    format: str | None
    max_shard_size: int | None
    dtype: str | None
    keep_dtype: tuple[str, ...]


def check_output(c: Problems, value: Any, base: Path) -> Output | None:
    if value is None:
        c.problem("output", None, "", 'missing: add [output] with path = "OUT.safetensors"')
        return None
    if not isinstance(value, dict):
        c.problem("output", None, "", "must be a table: [output] on a line of its own")
        return None
    bad = len(c.problems)
    c.unknown("output", None, value, OUTPUT_FIELDS)
    fmt = value.get("format")
    if fmt is not None and fmt not in FORMATS:
        c.problem(
            "output",
            None,
            "format",
            f"{show(fmt)} is not allowed; use one of {', '.join(map(repr, FORMATS))}",
        )
        fmt = None
    max_shard_size = _shard_size(c, value.get("max_shard_size"), fmt)
    dtype, keep_dtype = _dtype(c, value)
    path = value.get("path")
    if path is None:
        c.problem(
            "output",
            None,
            "",
            'missing field path: the file to write, e.g. path = "out.safetensors"',
        )
    elif not isinstance(path, str) or not path:
        c.problem("output", None, "path", f"must be a file name in quotes, got {show(path)}")
    elif fmt is None and "format" not in value and "max_shard_size" not in value:
        from ckptsurgery.io import output_format

        try:
            output_format(path, None)
        except CheckpointError:
            c.problem(
                "output",
                None,
                "path",
                f"cannot tell the format from {path!r}; use a .safetensors, .pt, .pth or .bin "
                'name, or add format = "safetensors" or "torch"',
            )
    if len(c.problems) > bad or not isinstance(path, str):
        return None
    return Output(resolve(base, path), fmt, max_shard_size, dtype, keep_dtype)


def _shard_size(c: Problems, value: Any, fmt: str | None) -> int | None:
    """``[output] max_shard_size``: "5GB", "2GiB" or a number of bytes."""
    if value is None:
        return None
    from ckptsurgery.io import parse_size

    if isinstance(value, bool) or not isinstance(value, str | int):
        message = f'must be a size such as "5GB" or a number of bytes, got {show(value)}'
        c.problem("output", None, "max_shard_size", message)
        return None
    try:
        size = parse_size(value)
    except CheckpointError:
        message = f'{value!r} is not a size; use e.g. "5GB", "500MB", "2GiB" or bytes'
        c.problem("output", None, "max_shard_size", message)
        return None
    if fmt == "torch":
        message = 'writes safetensors shards; remove format = "torch" or this field'
        c.problem("output", None, "max_shard_size", message)
        return None
    return size


def _dtype(c: Problems, value: Mapping[str, Any]) -> tuple[str | None, tuple[str, ...]]:
    """``[output] dtype``, the dtype to write the tensors in, and ``keep_dtype``, the globs of
    the tensors that keep their own (only with dtype)."""
    allowed = ", ".join(map(repr, DTYPES))
    dtype = value.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        c.problem("output", None, "dtype", f"{show(dtype)} is not allowed; use one of {allowed}")
        dtype = None
    raw = value.get("keep_dtype")
    if raw is None:
        return dtype, ()
    globs = [raw] if isinstance(raw, str) else raw
    if not isinstance(globs, list) or not all(isinstance(g, str) and g for g in globs):
        message = f'must be a list of globs such as ["*.running_*"], got {show(raw)}'
        c.problem("output", None, "keep_dtype", message)
        return dtype, ()
    if "dtype" not in value:
        message = f"applies only with dtype (one of {allowed}); add dtype or remove keep_dtype"
        c.problem("output", None, "keep_dtype", message)
        return None, ()
    return dtype, tuple(globs)
