"""Which of several nested state dicts to use: by how well each fits a model, then by name.

A training checkpoint often holds two copies of the network: ``student`` and ``teacher``
(DINO), ``model`` and ``model_ema`` (timm), ``state_dict`` and ``state_dict_ema``. Both fit
the model alike; the averaged copy (EMA, or the teacher, itself an EMA of the student) is the
one people fine-tune from, as timm's own loader prefers ``state_dict_ema`` when asked for EMA
weights and DINO publishes the teacher. :func:`recommend` picks among the candidates that fit
best, and says why.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CandidateFit", "preferred", "recommend"]

# Name parts of the averaged copy, which fine-tuning starts from.
_AVERAGED = re.compile(r"(^|[^a-z])(ema|teacher|averaged|swa|momentum_teacher)([^a-z]|$)", re.I)


@dataclass(frozen=True)
class CandidateFit:
    """One nested state dict and how well it fits the model."""

    key: str  # its path inside the file (``teacher``, ``model/ema``)
    tensors: int
    bytes: int
    matched: int  # model keys it matches as it is
    matched_with_rules: int  # ... with the rules suggested for it
    model_keys: int
    compatible: bool  # fits as it is (nothing missing, unexpected or mismatched beyond allowed)

    @property
    def fits(self) -> bool:
        """Whether every model key is matched, as it is or with the suggested rules."""
        return self.matched_with_rules == self.model_keys or self.compatible

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "tensors": self.tensors,
            "bytes": self.bytes,
            "matched": self.matched,
            "matched_with_rules": self.matched_with_rules,
            "model_keys": self.model_keys,
            "compatible": self.compatible,
            "fits": self.fits,
        }


def is_averaged(key: str) -> bool:
    """Whether a candidate's path names the averaged copy (``model_ema``, ``teacher``)."""
    return any(_AVERAGED.search(part) for part in key.split("/"))


def preferred(keys: Sequence[str]) -> str | None:
    """The candidate to use when names alone decide: the only averaged copy, if one is."""
    averaged = [k for k in keys if is_averaged(k)]
    return averaged[0] if len(averaged) == 1 else None


def recommend(fits: Sequence[CandidateFit]) -> tuple[str | None, str]:
    """The candidate to use, and the reason, in words; (None, why) when none can be chosen."""
    if not fits:
        return None, "no candidate"
    best = max(f.matched_with_rules for f in fits)
    if best == 0:
        return None, "no candidate matches any model key"
    top = [f for f in fits if f.matched_with_rules == best]
    if len(top) == 1:
        others = ", ".join(f"{f.key} {f.matched_with_rules}" for f in fits if f is not top[0])
        return top[0].key, (
            f"it matches the most model keys ({best} of {top[0].model_keys}"
            + (f"; {others}" if others else "")
            + ")"
        )
    name = preferred([f.key for f in top])
    if name is not None:
        others = ", ".join(f.key for f in top if f.key != name)
        return name, (
            f"{others} {'fits' if len(top) == 2 else 'fit'} as well ({best} of "
            f"{top[0].model_keys} model keys), and the EMA / teacher weights are what "
            "fine-tuning usually starts from"
        )
    return None, (
        f"{', '.join(f.key for f in top)} fit alike ({best} of {top[0].model_keys} model keys); "
        "choose one with --key"
    )
