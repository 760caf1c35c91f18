"""The names of a peft LoRA adapter's tensors: which are LoRA factors of which module, and
which are full copies of base tensors (see :mod:`ckptsurgery.plan.lora`). No torch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ckptsurgery.io import TensorInfo
from ckptsurgery.keygroups import group_keys
from ckptsurgery.plan.lora_config import LoraError

__all__ = ["PREFIX", "Target", "groups", "split_keys"]

PREFIX = "base_model.model."  # peft's PeftModel -> LoraModel -> the base model
_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
_SHOWN = 5


@dataclass(frozen=True)
class Target:
    """One adapted module's tensors in the adapter (keys of its state dict)."""

    module: str
    embedding: bool
    a: str | None = None
    b: str | None = None
    b_bias: str | None = None


def split_keys(
    infos: Mapping[str, TensorInfo], label: str
) -> tuple[dict[str, Target], dict[str, str]]:
    """The adapter's keys: the LoRA targets by module, and the full copies (base name -> key)."""
    targets: dict[str, Target] = {}
    copies: dict[str, str] = {}
    names: set[str] = set()
    unknown: list[str] = []
    for key in infos:
        bare = key.removeprefix(PREFIX)
        parts = bare.split(".")
        at = [i for i, p in enumerate(parts) if p in _PARTS]
        if not at:
            if any(p.startswith("lora_") for p in parts):
                unknown.append(key)
                continue
            # modules_to_save copies (older peft: "<m>.modules_to_save.<name>.weight" with the
            # name removed) and the wrapped layer's own tensors ("<m>.base_layer.bias").
            kept = [p for p in parts if p not in ("modules_to_save", "base_layer")]
            copies[".".join(kept)] = key
            continue
        i = at[-1]
        module, part, rest = ".".join(parts[:i]), parts[i], parts[i + 1 :]
        embedding = part.startswith("lora_embedding_")
        leaf = None if embedding else (rest[-1] if rest else None)
        named = rest if embedding else rest[:-1]
        if len(named) > 1 or (not embedding and leaf not in ("weight", "bias")):
            unknown.append(key)
            continue
        if leaf == "bias" and part != "lora_B":
            unknown.append(key)
            continue
        names.update(named)
        t = targets.get(module, Target(module, embedding))
        side = "b_bias" if leaf == "bias" else part[-1].lower()  # a, b
        t = _replace(t, **{side: key})
        if t.embedding != embedding:
            unknown.append(key)
            continue
        targets[module] = t
    if unknown:
        raise LoraError(
            f"{label}: {len(unknown)} tensor{'s' if len(unknown) != 1 else ''} of no LoRA kind "
            f"this can fold ({groups(unknown)})"
        )
    if len(names) > 1:
        raise LoraError(
            f"{label} holds several adapters ({', '.join(sorted(names))}); save each with "
            "peft's save_pretrained(selected_adapters=[...]) and fold one"
        )
    if not targets:
        raise LoraError(f"{label} holds no lora_A / lora_B tensors")
    return targets, copies


def _replace(t: Target, **changes: Any) -> Target:
    return replace(t, **changes)


def groups(keys: Sequence[str]) -> str:
    """``keys`` grouped (``layer.{0, 1}.q.weight``) for a message, the first few."""
    shown = group_keys(keys)
    return ", ".join(shown[:_SHOWN]) + (", ..." if len(shown) > _SHOWN else "")
