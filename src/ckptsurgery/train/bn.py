"""BatchNorm in fine-tuning: frozen layers kept in eval mode, running statistics re-estimated,
and the frozen backbone proven unchanged.

- :func:`frozen_batchnorms` lists the BatchNorm layers whose parameters are all frozen (and
  those without affine parameters outside the head). In train mode such a layer would still
  update its running statistics, silently changing a "frozen" backbone, so :func:`train_mode`
  calls ``model.train()`` and then puts each of them back into eval mode. The loop calls it at
  the start of every epoch, so nothing (an evaluation in between, a user hook) can leave them in
  train mode.
- :func:`frozen_digests` fingerprints every frozen tensor (parameters *and* buffers) by its raw
  bytes; :func:`verify_frozen` raises :class:`FrozenTensorsChanged` when any differs after
  training: the MoCo "the backbone did not change" sanity check, for any model.
- :func:`recalibrate_bn` re-estimates running statistics as a cumulative average over the
  given batches (``momentum=None``), in train mode without gradients.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ckptsurgery.train.errors import FrozenTensorsChanged
from ckptsurgery.train.heads import Head, is_head_key

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "batchnorms",
    "frozen_batchnorms",
    "frozen_digests",
    "recalibrate_bn",
    "tensor_digest",
    "train_mode",
    "verify_frozen",
]


def batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm layer (1d/2d/3d, SyncBatchNorm, lazy ones) with its name."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def frozen_batchnorms(model: nn.Module, head: Head) -> list[nn.Module]:
    """The BatchNorm layers outside the head whose parameters are all frozen."""
    return [
        m
        for name, m in batchnorms(model)
        if not is_head_key(name + ".", head)
        and not any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def train_mode(model: nn.Module, frozen: Iterable[nn.Module]) -> None:
    """``model.train()``, then the ``frozen`` BatchNorm layers back in eval mode."""
    model.train()
    for module in frozen:
        module.eval()


def frozen_digests(model: nn.Module, head: Head) -> dict[str, str]:
    """A digest of the raw bytes of every frozen tensor outside the head.

    Frozen means ``requires_grad=False`` for a parameter; a buffer counts as frozen when its
    module has no trainable parameter, which covers the running statistics of a frozen
    BatchNorm (kept in eval mode by :func:`train_mode`).
    """
    out: dict[str, str] = {}
    for module_name, module in model.named_modules():
        own_params = list(module.named_parameters(recurse=False))
        module_trains = any(p.requires_grad for _, p in own_params)
        prefix = module_name + "." if module_name else ""
        if is_head_key(prefix, head):
            continue
        for name, p in own_params:
            if not p.requires_grad:
                out[prefix + name] = tensor_digest(p)
        if not module_trains:
            for name, b in module.named_buffers(recurse=False):
                if b is not None:
                    out[prefix + name] = tensor_digest(b)
    return out


def verify_frozen(model: nn.Module, head: Head, before: dict[str, str]) -> None:
    """Raise :class:`FrozenTensorsChanged` unless every tensor in ``before`` is bit-identical."""
    after = frozen_digests(model, head)
    changed = tuple(k for k, d in before.items() if after.get(k) != d)
    if changed:
        shown = ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else "")
        raise FrozenTensorsChanged(
            f"{len(changed)} frozen tensor(s) changed during training ({shown}); the backbone "
            "was not frozen (a BatchNorm layer in train mode, or weight decay / momentum on a "
            "frozen parameter?); the outputs must not be trusted",
            changed=changed,
        )


def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    forward: Callable[[torch.Tensor], object] | None = None,
) -> int:
    """Re-estimate every BatchNorm layer's running statistics on ``batches``; returns how many.

    Statistics are reset and accumulated as an exact average over the batches (``momentum=None``)
    with the model in train mode and no gradients; each layer's momentum and the model's
    training flag are restored afterwards. Only the BatchNorm buffers change: the forward
    passes update nothing else (dropout draws random numbers but has no state).
    """
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    layers = [
        m for _, m in batchnorms(model) if isinstance(m, _BatchNorm) and m.track_running_stats
    ]
    if not layers:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    n = 0
    try:
        with torch.no_grad():
            for x in batches:
                (forward or model)(x)
                n += 1
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return n


def tensor_digest(t: torch.Tensor) -> str:
    """The tensor's dtype, shape and a hash of its raw bytes (bit-exact, NaN-safe)."""
    import torch

    data = t.detach()
    if data.numel() == 0:
        return f"{data.dtype}{tuple(data.shape)}:empty"
    raw = data.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
    return f"{data.dtype}{tuple(data.shape)}:{hashlib.blake2b(raw, digest_size=20).hexdigest()}"
