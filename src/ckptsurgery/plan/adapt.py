"""Shape adapters as data: what the user asks for (:class:`Rows`, :class:`InChans`,
:class:`ResamplePosEmbed`, each naming the tensors it applies to by a glob), bound to the plan's
output tensors from their headers (:func:`bind_adapters`).

The same value is built from CLI flags (``--rows``, ``--in-chans``, ``--resample-pos-embed``),
a recipe's ``[[adapt]]`` tables (:func:`adapter_from_dict`) or Python, and written back as
either (:meth:`to_dict`, :meth:`describe`).

Decisions:

- An adapter's glob matches the *output* names, after the renaming rules and the merge: the
  names the model uses. ``*`` matches dots too; an exact key is a glob that matches itself.
- ``rows`` on ``X.weight`` also takes the same rows of ``X.bias`` when there is one with as
  many rows, so ``--rows fc.weight 0-9`` and ``--rows 'fc.*' 0-9`` do the same.
- A tensor matched by two adapters is an error; an adapter that matches no tensor is a note
  (as a rule that matches no key is).
- Every check that needs a shape (the rank, an index out of range, a grid that is not square)
  is made here, from the headers, before any tensor byte is read.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, ClassVar

from ckptsurgery.errors import RuleError
from ckptsurgery.io.dtypes import TensorInfo
from ckptsurgery.plan.adapt_text import (
    AdapterError,
    check_grid,
    format_indices,
    parse_grid,
    parse_indices,
    read_indices,
)
from ckptsurgery.plan.adapters import (
    ANTIALIASED,
    INTERPOLATIONS,
    in_chans_op,
    resample_op,
    rows_op,
)
from ckptsurgery.plan.model import Op

__all__ = [
    "ADAPT_FIELDS",
    "Adapter",
    "AdapterError",
    "InChans",
    "ResamplePosEmbed",
    "Rows",
    "adapter_from_dict",
    "bind_adapters",
    "format_indices",
    "parse_adapter_flags",
    "parse_grid",
    "parse_indices",
    "read_indices",
]

_FLOATING = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Rows:
    """Keep rows ``indices`` (dim 0, in this order, repeats allowed) of the tensors matching
    ``key``, and of the ``.bias`` beside each matching ``.weight``."""

    key: str
    indices: tuple[int, ...]
    op: ClassVar[str] = "rows"

    def __init__(self, key: str, indices: Iterable[int]) -> None:
        object.__setattr__(self, "key", _glob(key))
        object.__setattr__(self, "indices", _indices(indices))

    def bind(self, name: str, info: TensorInfo) -> Op:
        if not info.shape:
            raise _rank(self, name, info, "at least one dimension (rows to keep)")
        bad = [i for i in self.indices if i >= info.shape[0]]
        if bad:
            raise RuleError(
                f"{self.describe()}: index {bad[0]} is out of range for {name} "
                f"{list(info.shape)} ({info.shape[0]} rows: 0-{info.shape[0] - 1})"
            )
        return rows_op(self.indices, info.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "key": self.key, "indices": format_indices(self.indices)}

    def describe(self) -> str:
        return f"--rows {shlex.quote(self.key)} {shlex.quote(format_indices(self.indices))}"


@dataclass(frozen=True)
class InChans:
    """Adapt the first convolution ``key`` (``[O, I, kh, kw]``) to ``channels`` input
    channels, as timm's ``adapt_input_conv`` does."""

    key: str
    channels: int
    op: ClassVar[str] = "in-chans"

    def __init__(self, key: str, channels: int) -> None:
        object.__setattr__(self, "key", _glob(key))
        object.__setattr__(self, "channels", _positive("channels", channels))

    def bind(self, name: str, info: TensorInfo) -> Op:
        if len(info.shape) != 4:
            raise _rank(self, name, info, "a convolution weight [out, in, kh, kw]")
        _floating(self, name, info)
        return in_chans_op(self.channels, info.shape[1])

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "key": self.key, "channels": self.channels}

    def describe(self) -> str:
        return f"--in-chans {shlex.quote(self.key)} {self.channels}"


@dataclass(frozen=True)
class ResamplePosEmbed:
    """Resample the absolute position embedding ``key`` (``[1, K + h*w, D]`` or
    ``[K + h*w, D]``) to a ``size`` grid, as timm's ``resample_abs_pos_embed`` does.

    ``prefix_tokens`` (K, default 1: a class token) are kept as they are; ``old_size`` is the
    stored grid (default: the square root of the other tokens); ``antialias`` defaults to True
    for bicubic and bilinear, the modes it applies to.
    """

    key: str
    size: tuple[int, int]
    prefix_tokens: int = 1
    interpolation: str = "bicubic"
    antialias: bool = True
    old_size: tuple[int, int] | None = None
    op: ClassVar[str] = "resample-pos-embed"

    def __init__(
        self,
        key: str,
        size: Sequence[int] | str,
        *,
        prefix_tokens: int = 1,
        interpolation: str = "bicubic",
        antialias: bool | None = None,
        old_size: Sequence[int] | str | None = None,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "key", _glob(key))
        set_(self, "size", check_grid("size", size))
        set_(self, "old_size", None if old_size is None else check_grid("old_size", old_size))
        if (
            isinstance(prefix_tokens, bool)
            or not isinstance(prefix_tokens, int)
            or prefix_tokens < 0
        ):
            raise AdapterError(
                f"prefix_tokens must be a whole number >= 0, got {prefix_tokens!r}",
                field="prefix_tokens",
            )
        set_(self, "prefix_tokens", prefix_tokens)
        if interpolation not in INTERPOLATIONS:
            raise AdapterError(
                f"interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}",
                field="interpolation",
            )
        set_(self, "interpolation", interpolation)
        if antialias is None:
            antialias = interpolation in ANTIALIASED
        if not isinstance(antialias, bool):
            raise AdapterError(
                f"antialias must be true or false, got {antialias!r}", field="antialias"
            )
        if antialias and interpolation not in ANTIALIASED:
            raise AdapterError(
                f"antialias applies to {' and '.join(ANTIALIASED)} only, not {interpolation}; "
                "turn it off (--no-antialias, antialias = false)",
                field="antialias",
            )
        set_(self, "antialias", antialias)

    def bind(self, name: str, info: TensorInfo) -> Op:
        shape = info.shape
        if not (len(shape) == 2 or (len(shape) == 3 and shape[0] == 1)):
            raise _rank(self, name, info, "a position embedding [1, tokens, dim] or [tokens, dim]")
        _floating(self, name, info)
        tokens = shape[-2] - self.prefix_tokens
        if tokens <= 0:
            raise RuleError(
                f"{self.describe()}: {name} {list(shape)} has {shape[-2]} tokens, not more than "
                f"the {self.prefix_tokens} prefix tokens; check --prefix-tokens"
            )
        old = self.old_size
        if old is None:
            side = math.isqrt(tokens)
            if side * side != tokens:
                raise RuleError(
                    f"{self.describe()}: {name} {list(shape)} has {tokens} tokens after "
                    f"{self.prefix_tokens} prefix token{'s' if self.prefix_tokens != 1 else ''}, "
                    "not a square grid; give the stored grid with --old-size HxW "
                    "(old_size in a recipe) or the right --prefix-tokens"
                )
            old = (side, side)
        elif old[0] * old[1] != tokens:
            raise RuleError(
                f"{self.describe()}: {name} {list(shape)} has {tokens} tokens after "
                f"{self.prefix_tokens} prefix tokens, not {old[0]}x{old[1]} = {old[0] * old[1]}"
            )
        return resample_op(
            self.size,
            old,
            prefix_tokens=self.prefix_tokens,
            interpolation=self.interpolation,
            antialias=self.antialias,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "op": self.op,
            "key": self.key,
            "size": f"{self.size[0]}x{self.size[1]}",
            "prefix_tokens": self.prefix_tokens,
            "interpolation": self.interpolation,
            "antialias": self.antialias,
        }
        if self.old_size is not None:
            out["old_size"] = f"{self.old_size[0]}x{self.old_size[1]}"
        return out

    def describe(self) -> str:
        text = f"--resample-pos-embed {shlex.quote(self.key)} {self.size[0]}x{self.size[1]}"
        if self.prefix_tokens != 1:
            text += f" --prefix-tokens {self.prefix_tokens}"
        if self.interpolation != "bicubic":
            text += f" --interpolation {self.interpolation}"
        if not self.antialias and self.interpolation in ANTIALIASED:
            text += " --no-antialias"
        if self.old_size is not None:
            text += f" --old-size {self.old_size[0]}x{self.old_size[1]}"
        return text


Adapter = Rows | InChans | ResamplePosEmbed

# A recipe's [[adapt]] fields, per op (besides op and key).
ADAPT_FIELDS: dict[str, tuple[str, ...]] = {
    "rows": ("indices", "indices_file"),
    "in-chans": ("channels",),
    "resample-pos-embed": ("size", "prefix_tokens", "interpolation", "antialias", "old_size"),
}


def adapter_from_dict(data: Mapping[str, Any], *, base: Path | str = ".") -> Adapter:
    """An adapter from a recipe's ``[[adapt]]`` table (``indices_file`` is read from ``base``);
    :class:`AdapterError` naming the field at fault otherwise."""
    op = data.get("op")
    if op not in ADAPT_FIELDS:
        raise AdapterError(
            f"op must be one of {', '.join(map(repr, ADAPT_FIELDS))}, got {op!r}", field="op"
        )
    allowed = ("op", "key", *ADAPT_FIELDS[op])
    for name in data:
        if name not in allowed:
            raise AdapterError(
                f"unknown field for op {op!r}; allowed: {', '.join(allowed)}", field=name
            )
    key = data.get("key")
    if not isinstance(key, str) or not key:
        raise AdapterError(
            f'must be the output key or a glob such as "head.*", got {key!r}', field="key"
        )
    if op == "rows":
        if ("indices" in data) == ("indices_file" in data):
            raise AdapterError(
                'give one of indices = "0-9" (or a list of numbers) and indices_file = "FILE"',
                field="indices",
            )
        if "indices_file" in data:
            path = data["indices_file"]
            if not isinstance(path, str) or not path:
                raise AdapterError(f"must be a file name, got {path!r}", field="indices_file")
            return Rows(key, _field("indices_file", read_indices, Path(base) / path))
        raw = data["indices"]
        if isinstance(raw, str):
            return Rows(key, _field("indices", parse_indices, raw))
        if not isinstance(raw, list):
            raise AdapterError(
                f'must be a list of numbers or "0,5,7-9", got {raw!r}', field="indices"
            )
        return Rows(key, _field("indices", _indices, raw))
    if op == "in-chans":
        if "channels" not in data:
            raise AdapterError(
                "missing: the number of input channels, e.g. channels = 1", field="channels"
            )
        return InChans(key, data["channels"])
    if "size" not in data:
        raise AdapterError("missing: the new grid, e.g. size = [24, 24]", field="size")
    return ResamplePosEmbed(
        key,
        data["size"],
        prefix_tokens=data.get("prefix_tokens", 1),
        interpolation=data.get("interpolation", "bicubic"),
        antialias=data.get("antialias"),
        old_size=data.get("old_size"),
    )


def parse_adapter_flags(
    rows: Sequence[tuple[str, str]] = (),
    in_chans: Sequence[tuple[str, int]] = (),
    resample_pos_embed: Sequence[tuple[str, str]] = (),
    *,
    prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool | None = None,
    old_size: str | None = None,
) -> tuple[Adapter, ...]:
    """The adapters of the CLI's flags: ``--rows GLOB INDICES`` (``@FILE`` read from the
    current folder), ``--in-chans KEY N`` and ``--resample-pos-embed KEY HxW`` (each with the
    shared ``--prefix-tokens``, ``--interpolation``, ``--no-antialias``, ``--old-size``)."""
    out: list[Adapter] = []
    for glob, text in rows:
        flag = f"--rows {shlex.quote(glob)} {shlex.quote(text)}"
        try:
            found = read_indices(text[1:]) if text.startswith("@") else parse_indices(text)
            out.append(Rows(glob, found))
        except AdapterError as e:
            raise AdapterError(f"{flag}: {e}") from None
    for key, channels in in_chans:
        try:
            out.append(InChans(key, channels))
        except AdapterError as e:
            raise AdapterError(f"--in-chans {shlex.quote(key)} {channels}: {e}") from None
    for key, size in resample_pos_embed:
        try:
            out.append(
                ResamplePosEmbed(
                    key,
                    parse_grid(size),
                    prefix_tokens=prefix_tokens,
                    interpolation=interpolation,
                    antialias=antialias,
                    old_size=None if old_size is None else parse_grid(old_size),
                )
            )
        except AdapterError as e:
            flag = f"--resample-pos-embed {shlex.quote(key)} {shlex.quote(size)}"
            raise AdapterError(f"{flag}: {e}") from None
    return tuple(out)


def bind_adapters(
    adapters: Sequence[Adapter], infos: Mapping[str, TensorInfo]
) -> tuple[dict[str, Op], list[str]]:
    """The op each output tensor (``infos``: name -> facts, after the rules) is made by, for
    those an adapter matches, and the notes (adapters that matched nothing)."""
    ops: dict[str, Op] = {}
    by: dict[str, Adapter] = {}
    notes: list[str] = []
    for adapter in adapters:
        names = [n for n in infos if fnmatchcase(n, adapter.key)]
        if isinstance(adapter, Rows):
            names += _biases(names, infos)
        if not names:
            notes.append(f"{adapter.describe()} matched no key")
        for name in dict.fromkeys(names):
            if name in by and by[name] != adapter:
                raise RuleError(
                    f"{name} is matched by two adapters ({by[name].describe()} and "
                    f"{adapter.describe()}); one adapter per tensor"
                )
            by[name] = adapter
            ops[name] = adapter.bind(name, infos[name])
    return ops, notes


def _biases(names: Sequence[str], infos: Mapping[str, TensorInfo]) -> list[str]:
    """The ``X.bias`` with as many rows as each ``X.weight`` of ``names``."""
    out = []
    for name in names:
        if name.endswith(".weight"):
            bias = name.removesuffix("weight") + "bias"
            w, b = infos[name].shape, infos.get(bias)
            if b is not None and w and b.shape and b.shape[0] == w[0]:
                out.append(bias)
    return out


# -- checks ------------------------------------------------------------------------------------


def _glob(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise AdapterError(f"the key must be a non-empty glob, got {key!r}", field="key")
    return key


def _indices(values: Iterable[int]) -> tuple[int, ...]:
    if isinstance(values, str):
        return parse_indices(values)
    out = tuple(values)
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise AdapterError(
                f"row indices must be whole numbers >= 0, got {v!r}", field="indices"
            )
    if not out:
        raise AdapterError("no row index given", field="indices")
    return out


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterError(f"{name} must be a whole number >= 1, got {value!r}", field=name)
    return value


def _field(name: str, f: Any, *args: Any) -> Any:
    """``f(*args)``, its :class:`AdapterError` said to be about field ``name``."""
    try:
        return f(*args)
    except AdapterError as e:
        raise AdapterError(str(e), field=e.field or name) from None


def _rank(adapter: Adapter, name: str, info: TensorInfo, wanted: str) -> RuleError:
    return RuleError(
        f"{adapter.describe()}: {name} has shape {list(info.shape)}; this adapter needs {wanted}"
    )


def _floating(adapter: Adapter, name: str, info: TensorInfo) -> None:
    if info.dtype not in _FLOATING:
        raise RuleError(
            f"{adapter.describe()}: {name} is {info.dtype}; this adapter computes on floating "
            f"tensors ({', '.join(_FLOATING)})"
        )
