"""Reading a peft LoRA adapter's ``adapter_config.json``: the settings a fold needs, and the
refusal of everything it cannot fold (see :mod:`ckptsurgery.plan.lora`). No torch."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptsurgery.errors import MergeError

__all__ = ["CONFIG_FILE", "LoraConfig", "LoraError", "parse_config"]

CONFIG_FILE = "adapter_config.json"
# LoraConfig fields that turn on a variant whose merge is not W + scale * B @ A, or that need
# more than the base and the adapter; each is refused when set (truthy).
_VARIANTS = {
    "use_dora": "DoRA (use_dora)",
    "velora_config": "VeLoRA (velora_config)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "lora_ga_config": "LoRA-GA (lora_ga_config)",
}
# Inits that rewrite the base weights when the adapter is made (W - B @ A): the adapter then
# folds onto that residual, not onto the base checkpoint.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class LoraError(MergeError):
    """A LoRA adapter that cannot be folded into this base (or not at all)."""


@dataclass(frozen=True)
class LoraConfig:
    """What folding needs of ``adapter_config.json``."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    bias: str = "none"

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """The rank and alpha of ``module``: peft's ``get_pattern_key`` (the first pattern
        matching the end of the name at a dot), else ``r`` and ``lora_alpha``."""
        return (
            _pattern(self.rank_pattern, module, self.r),
            _pattern(self.alpha_pattern, module, self.lora_alpha),
        )

    def scale(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        return {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "fan_in_fan_out": self.fan_in_fan_out,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": list(self.modules_to_save),
            "bias": self.bias,
        }


def _pattern(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def parse_config(data: Any, *, name: str = CONFIG_FILE) -> LoraConfig:
    """The folding settings of a parsed ``adapter_config.json``, or :class:`LoraError` naming
    what cannot be folded."""
    if not isinstance(data, dict):
        raise LoraError(f"{name} is not a JSON object")
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise LoraError(
            f"{name}: peft_type {peft_type!r} is not supported; only LORA adapters can be "
            "folded (not LoHa, LoKr, IA3, AdaLoRA, prompt tuning, ...)"
        )
    variants = [label for key, label in _VARIANTS.items() if data.get(key)]
    if variants:
        raise LoraError(
            f"{name}: {', '.join(variants)} is not supported; only plain LoRA (W + scale * B @ "
            "A) can be folded; merge it with peft's merge_and_unload() instead"
        )
    init = data.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise LoraError(
            f"{name}: init_lora_weights={init!r} changed the base weights when the adapter was "
            "made, so it does not fold onto the base checkpoint; save it converted with "
            "save_pretrained(path_initial_model_for_weight_conversion=...) first"
        )
    r, alpha = data.get("r"), data.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise LoraError(f"{name}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise LoraError(f"{name}: lora_alpha must be a number, got {alpha!r}")
    patterns: dict[str, dict[str, Any]] = {}
    for fld in ("rank_pattern", "alpha_pattern"):
        value = data.get(fld) or {}
        if not isinstance(value, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
        ):
            raise LoraError(f"{name}: {fld} must map module patterns to numbers")
        patterns[fld] = value
    to_save = data.get("modules_to_save") or []
    if not isinstance(to_save, list):
        raise LoraError(f"{name}: modules_to_save must be a list of module names")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(data.get("use_rslora", False)),
        fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
        rank_pattern=patterns["rank_pattern"],
        alpha_pattern=patterns["alpha_pattern"],
        modules_to_save=tuple(str(m) for m in to_save),
        bias=str(data.get("bias", "none")),
    )
