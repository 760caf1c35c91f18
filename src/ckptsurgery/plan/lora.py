"""Folding a ``peft`` LoRA adapter into its base model, planned from headers alone.

A LoRA adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``). Its tensors are named after the module they adapt, behind peft's
wrapper prefix::

    base_model.model.<module>.lora_A.weight          [r, in]          (Linear)
    base_model.model.<module>.lora_B.weight          [out, r]
    base_model.model.<module>.lora_A.weight          [r, in, kh, kw]  (Conv2d; B is [out, r, 1, 1])
    base_model.model.<module>.lora_embedding_A       [r, num]         (Embedding)
    base_model.model.<module>.lora_embedding_B       [dim, r]
    base_model.model.<module>.lora_B.bias            [out]            (lora_bias=True)
    base_model.model.<classifier>.weight             full copies (modules_to_save, bias="all")

(an adapter name may follow ``lora_A`` / ``lora_embedding_A``: ``lora_A.default.weight``).
Each folded base weight ``<module>.weight`` becomes ``W + scale * delta`` with ``scale =
alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), ``r`` and ``alpha`` taken from
``rank_pattern`` / ``alpha_pattern`` as peft matches them (the first pattern that matches
the end of the module's name, at a dot), and ``delta``:

- Linear: ``B @ A`` (transposed with ``fan_in_fan_out``: GPT-2's Conv1D stores ``[in, out]``);
- Embedding: ``(B @ A).T``;
- Conv (1x1 and kxk): ``B[:, :, 0, 0] @ A.flatten(1)`` reshaped to the weight's shape, which
  is peft's ``conv2d(A.transpose(0, 1), B).transpose(0, 1)`` for a 1x1 ``B``.

The adapter's full copies replace the base's tensors of the same name. Each fold is one plan
entry, op ``lora-fold`` over (base weight, A, B) refs into the base and the adapter sources;
the math is :mod:`ckptsurgery.plan.lora_math`, imported when a tensor is made. Everything
an adapter could ask that this does not fold (DoRA and the other LoRA variants, other PEFT
methods, inits that changed the base weights, trainable tokens) is refused by name
(:mod:`ckptsurgery.plan.lora_config` reads the config, :mod:`ckptsurgery.plan.lora_keys`
the tensor names). A base tensor stored under several names (tied) is folded under each.

Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptsurgery._types import PathLike
from ckptsurgery.io import Checkpoint, TensorInfo, open_checkpoint
from ckptsurgery.plan.lora_config import CONFIG_FILE, LoraConfig, LoraError, parse_config
from ckptsurgery.plan.lora_keys import PREFIX, Target, groups, split_keys
from ckptsurgery.plan.model import COPY, Op, Ref, SourcePart
from ckptsurgery.rules import Rules

__all__ = [
    "ADAPTER_FILES",
    "CONFIG_FILE",
    "LORA_FOLD",
    "LoraAdapter",
    "LoraConfig",
    "LoraError",
    "OpenedLora",
    "lora_from_dict",
    "open_lora",
    "parse_config",
]

LORA_FOLD = "lora-fold"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_FLOATING = ("float16", "bfloat16", "float32", "float64")
_SHOWN = 5


@dataclass(frozen=True)
class LoraAdapter:
    """A ``peft`` LoRA adapter to fold into the base: its folder (``adapter_config.json``
    and ``adapter_model.safetensors`` or ``adapter_model.bin``), or its weights file with the
    config beside it."""

    path: PathLike

    def files(self) -> tuple[Path, Path]:
        """(the config, the weights file), or :class:`LoraError` saying what is missing."""
        p = Path(self.path)
        if p.is_file():
            folder, weights = p.parent, p
        elif p.is_dir():
            folder = p
            found = [p / name for name in ADAPTER_FILES if (p / name).is_file()]
            if not found:
                raise LoraError(
                    f"{self.path}: no {' or '.join(ADAPTER_FILES)} in this folder; give the "
                    "folder peft's save_pretrained wrote"
                )
            weights = found[0]
        else:
            raise LoraError(f"LoRA adapter {str(self.path)!r} does not exist")
        config = folder / CONFIG_FILE
        if not config.is_file():
            raise LoraError(f"{self.path}: no {CONFIG_FILE} beside the adapter's weights")
        return config, weights

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def describe(self) -> str:
        return f"--lora {shlex.quote(str(self.path))}"


def lora_from_dict(table: Mapping[str, Any], *, base: PathLike = ".") -> LoraAdapter:
    """A recipe's ``[[lora]]`` table (``path``, relative to ``base``) as a :class:`LoraAdapter`."""
    unknown = sorted(set(table) - {"path"})
    if unknown:
        raise LoraError(f"unknown field {unknown[0]}; a [[lora]] table holds path only")
    path = table.get("path")
    if not isinstance(path, str) or not path:
        raise LoraError('missing field path: the adapter folder, e.g. path = "my-lora"')
    p = Path(path)
    return LoraAdapter(p if p.is_absolute() else Path(base) / p)


@dataclass
class OpenedLora:
    """An adapter opened for a plan: its settings, its weights (a source of the plan) and the
    digests the provenance records."""

    adapter: LoraAdapter
    config: LoraConfig
    config_path: Path
    weights_path: Path
    ckpt: Checkpoint
    config_sha256: str
    folded: int = 0
    replaced: int = 0

    @property
    def label(self) -> str:
        return str(self.weights_path)

    def source_part(self, taken: int) -> SourcePart:
        """The adapter as one of the plan's sources."""
        rules = Rules()
        return SourcePart(
            path=self.label,
            key=None,
            format=self.ckpt.format,
            tensors=len(self.ckpt.infos),
            bytes=self.ckpt.total_bytes,
            rules=rules,
            keys=rules.plan(self.ckpt.infos),
            taken=taken,
            role="lora",
        )

    def provenance(self) -> dict[str, Any]:
        """What the output's ``ckptsurgery.lora`` metadata records: the adapter's files and
        their sha256, the settings folded with, and the counts."""
        digest = hashlib.sha256()
        with open(self.weights_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return {
            "adapter": Path(self.adapter.path).name,
            "config": self.config_path.name,
            "config_sha256": self.config_sha256,
            "weights": self.weights_path.name,
            "weights_sha256": digest.hexdigest(),
            **self.config.to_dict(),
            "folded": self.folded,
            "replaced": self.replaced,
        }

    # --- binding to the plan ------------------------------------------------------------------

    def bind(
        self,
        raw: Sequence[tuple[str, Op, tuple[Ref, ...], tuple[Ref, ...]]],
        info: Callable[[Ref], TensorInfo],
        index: int,
        stored: Callable[[Ref], object] = lambda r: r,
    ) -> list[tuple[str, Op, tuple[Ref, ...], tuple[Ref, ...]]]:
        """``raw`` plan entries (output name, op, inputs, compare) with the adapter applied:
        its full copies replace the base's tensors, its LoRA pairs fold into them. ``index``
        is the adapter's source index in the plan; ``info`` gives a ref's facts; ``stored``
        names the stored tensor a ref reads (tied aliases share one).

        A base tensor stored once under several names (tied embeddings) is one parameter in
        the model, so peft's merge changes all its names: every copy of a folded tensor is
        folded alike (and stays tied in the output)."""
        infos = self.ckpt.infos
        targets, copies = split_keys(infos, self.label)
        out = {name: (op, refs, cmp) for name, op, refs, cmp in raw}
        missing = [new for new in copies if new not in out]
        missing += [
            t.module + ".weight" for t in targets.values() if t.module + ".weight" not in out
        ]
        missing += [
            t.module + ".bias"
            for t in targets.values()
            if t.b_bias is not None and t.module + ".bias" not in out
        ]
        if missing:
            raise LoraError(
                f"{self.label}: {len(missing)} tensor{'s' if len(missing) != 1 else ''} the "
                f"adapter changes {'are' if len(missing) != 1 else 'is'} not in the base "
                f"({groups(missing)}); the adapter's module names (after {PREFIX}) must be "
                "the base's key names: is this the adapter's base model? (a recipe's "
                "[[source]] rules can rename the base's keys to them)"
            )
        for new, key in copies.items():
            out[new] = (COPY, (Ref(index, key),), ())
        problems: list[str] = []
        for t in targets.values():
            wname = t.module + ".weight"
            op, refs, _ = out[wname]
            if not op.is_copy:
                raise LoraError(f"{wname}: a LoRA fold and {op.describe()} on one tensor")
            w = info(refs[0])
            fold = self._fold_op(t, w, problems)
            if fold is not None:
                assert t.a is not None and t.b is not None
                out[wname] = (fold, (refs[0], Ref(index, t.a), Ref(index, t.b)), ())
                if t.b_bias is not None:
                    bname = t.module + ".bias"
                    _, brefs, _ = out[bname]
                    bias = info(brefs[0])
                    if bias.shape != infos[t.b_bias].shape or bias.dtype not in _FLOATING:
                        problems.append(
                            f"{bname} {list(bias.shape)} {bias.dtype} cannot take lora_B.bias "
                            f"{list(infos[t.b_bias].shape)}"
                        )
                    else:
                        # peft: bias += lora_B.bias * scale
                        keep = ("r", "alpha", "scale")
                        params = (("kind", "bias"), *((k, v) for k, v in fold.params if k in keep))
                        out[bname] = (Op(LORA_FOLD, params), (brefs[0], Ref(index, t.b_bias)), ())
        if problems:
            raise LoraError(
                f"{self.label}: cannot fold {len(problems)} LoRA "
                f"target{'s' if len(problems) != 1 else ''}: {'; '.join(problems[:_SHOWN])}"
                + ("; ..." if len(problems) > _SHOWN else "")
            )
        folds = {
            stored(refs[0]): (op, refs)
            for name, (op, refs, _) in out.items()
            if op.name == LORA_FOLD and name not in copies
        }
        for name, (op, refs, _) in list(out.items()):
            if op.is_copy and len(refs) == 1 and stored(refs[0]) in folds:
                out[name] = (*folds[stored(refs[0])], ())
        self.folded = sum(1 for op, _, _ in out.values() if op.name == LORA_FOLD)
        self.replaced = len(copies)
        return [(name, *out[name]) for name, _, _, _ in raw]

    def _fold_op(self, t: Target, w: TensorInfo, problems: list[str]) -> Op | None:
        """The ``lora-fold`` op of ``t`` onto a base weight with facts ``w``, or None after
        adding what is wrong to ``problems``."""
        infos = self.ckpt.infos
        wname = t.module + ".weight"
        if t.a is None or t.b is None:
            have, lack = ("A", "B") if t.b is None else ("B", "A")
            problems.append(f"{t.module} has lora_{have} but no lora_{lack}")
            return None
        a, b = infos[t.a].shape, infos[t.b].shape
        r, alpha = self.config.rank_alpha(t.module)
        fan_in_fan_out = False
        if w.dtype not in _FLOATING:
            problems.append(f"{wname} is {w.dtype}, not a floating tensor")
            return None
        expect: tuple[int, ...] | None
        if t.embedding:
            kind = "embedding"
            expect = (a[1], b[0]) if len(a) == 2 and len(b) == 2 else None
        elif len(a) == 2:
            kind = "linear"
            fan_in_fan_out = self.config.fan_in_fan_out
            expect = None
            if len(b) == 2:
                expect = (a[1], b[0]) if fan_in_fan_out else (b[0], a[1])
        elif len(a) >= 3:
            kind = "conv"
            expect = None
            if len(b) == len(a) and all(k == 1 for k in b[2:]):
                expect = (b[0], *a[1:])
        else:
            problems.append(f"{t.module}: lora_A {list(a)} is no Linear, Conv or Embedding LoRA")
            return None
        rank_a = a[0]  # A is [r, ...] and B [out, r, ...] for every kind
        if expect is None or len(b) < 2 or rank_a != b[1]:
            problems.append(
                f"{t.module}: lora_A {list(a)} and lora_B {list(b)} do not make a {kind} LoRA"
            )
            return None
        if tuple(w.shape) != expect:
            hint = ""
            if kind == "linear" and tuple(w.shape) == expect[::-1]:
                hint = f" (fan_in_fan_out is {str(fan_in_fan_out).lower()} in {CONFIG_FILE})"
            problems.append(f"{wname} is {list(w.shape)} but its LoRA makes {list(expect)}{hint}")
            return None
        if rank_a != r:
            problems.append(
                f"{t.module}: the adapter holds rank {rank_a} but {CONFIG_FILE} gives r={r} "
                "(r / rank_pattern)"
            )
            return None
        params: tuple[tuple[str, Any], ...] = (
            ("kind", kind),
            ("r", r),
            ("alpha", alpha),
            ("scale", self.config.scale(r, alpha)),
        )
        if fan_in_fan_out:
            params += (("fan_in_fan_out", True),)
        return Op(LORA_FOLD, params)


def open_lora(
    adapter: LoraAdapter,
    *,
    allow_globals: tuple[str, ...] | list[str] = (),
    unsafe_pickle: bool = False,
) -> OpenedLora:
    """Read the adapter's config and open its weights (headers only; a ``.bin`` through the
    same restricted loader as every torch file). The caller closes ``ckpt``."""
    config_path, weights_path = adapter.files()
    data = config_path.read_bytes()
    try:
        parsed = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraError(f"{config_path} is not valid JSON: {e}") from None
    config = parse_config(parsed, name=str(config_path))
    ckpt = open_checkpoint(weights_path, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle)
    return OpenedLora(
        adapter=adapter,
        config=config,
        config_path=config_path,
        weights_path=weights_path,
        ckpt=ckpt,
        config_sha256=hashlib.sha256(data).hexdigest(),
    )
