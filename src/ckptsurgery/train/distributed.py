"""Training under ``torchrun``: one process per device, DistributedDataParallel, exact metrics.

``torchrun --nproc_per_node=N -m ckptsurgery train ...`` starts N copies of the same command;
torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``. :func:`from_env` reads them, and with
more than one process the trainer

- joins the process group (``gloo`` on the CPU, ``nccl`` on CUDA, one GPU per process:
  ``cuda:LOCAL_RANK``) and wraps the model in ``DistributedDataParallel``; gradients are
  averaged over the processes, so every replica takes the same steps;
- gives each process its part of the training set (``DistributedSampler``, reshuffled every
  epoch with ``set_epoch``); ``--batch-size`` is per process, the global batch is N times it;
- evaluates exactly: the evaluation split is cut by index (sample ``i`` goes to rank
  ``i mod N``, nothing padded or repeated), each process sums loss, correct predictions and
  samples over its part, and the sums are all-reduced: every sample counts once;
- before each evaluation and save, makes every replica hold rank 0's parameters and buffers,
  except the running statistics of BatchNorm layers that train, which are averaged over the
  processes (each saw only its part of the data; no buffer broadcast at every step). A frozen
  BatchNorm layer is not averaged: its statistics stay bit-identical;
- saves, checks and prints on rank 0 only, from the bare model (no ``module.`` prefix).

Every process raises the same errors (they see the same all-reduced numbers); when one fails,
torchrun stops the others.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptsurgery.train.errors import TrainError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "Dist",
    "all_reduce_sum",
    "barrier",
    "from_env",
    "join",
    "leave",
    "shard_indices",
    "sync_replicas",
    "wrap",
]


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` (1: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # set by :func:`join`
    owns_group: bool = False  # this run started the process group and ends it

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """The job as torchrun describes it (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``).

    A process group that the caller already started wins over the environment.
    """
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return Dist(
            rank=td.get_rank(),
            world=td.get_world_size(),
            local_rank=_env_int("LOCAL_RANK", 0),
            backend=str(td.get_backend()),
        )
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Dist()
    rank = _env_int("RANK", 0)
    if not 0 <= rank < world:
        raise TrainError(f"RANK={rank} is not in [0, WORLD_SIZE={world}); start with torchrun")
    return Dist(rank=rank, world=world, local_rank=_env_int("LOCAL_RANK", rank))


def join(dist: Dist, device: torch.device) -> Dist:
    """Start the process group for ``device`` (gloo on the CPU, nccl on CUDA) if none is."""
    import torch.distributed as td

    if not dist.enabled or dist.backend is not None:
        return dist
    if not td.is_available():
        raise TrainError("this torch build has no torch.distributed; run without torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise TrainError(
                f"WORLD_SIZE={dist.world} but {name} is not set; start distributed runs with "
                "torchrun (e.g. torchrun --standalone --nproc_per_node=2 -m ckptsurgery train ...)"
            )
    if device.type == "cuda":
        td.init_process_group(backend, device_id=device)
    else:
        td.init_process_group(backend)
    return Dist(dist.rank, dist.world, dist.local_rank, backend, owns_group=True)


def leave(dist: Dist) -> None:
    """End the process group if this run started it."""
    import torch.distributed as td

    if dist.owns_group and td.is_initialized():
        td.destroy_process_group()


def barrier(dist: Dist) -> None:
    import torch.distributed as td

    if dist.enabled:
        td.barrier()


def wrap(model: nn.Module, dist: Dist, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (itself when not distributed).

    Parameters are broadcast from rank 0 when wrapping; buffers are not broadcast at every step
    (:func:`sync_replicas` averages BatchNorm statistics before evaluation).
    """
    if not dist.enabled:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # No buffer broadcast at every forward. torch >= 2.14 calls it `forward_sync_buffers` (and
    # warns about `broadcast_buffers`). Every process builds, seeds and loads the model the
    # same way, so its buffers start equal either way.
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    flag = "forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers"
    options: dict[str, Any] = {flag: False}
    return DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, **options
    )


def shard_indices(n: int, dist: Dist) -> range:
    """This rank's samples of an ``n``-sample split: ``rank, rank + world, ...`` (no padding)."""
    return range(dist.rank, n, dist.world)


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Sum ``t`` over the processes, in place; returns it."""
    import torch.distributed as td

    if dist.enabled:
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def sync_replicas(model: nn.Module, dist: Dist, *, frozen_bn: Iterable[nn.Module] = ()) -> None:
    """Make every replica evaluate and save the same weights (see the module docstring).

    Running statistics of the BatchNorm layers that train are averaged over the processes;
    every other parameter and buffer (frozen BatchNorm layers' included) is copied from rank 0.
    """
    if not dist.enabled:
        return
    import torch
    import torch.distributed as td

    from ckptsurgery.train.bn import batchnorms

    frozen = {id(m) for m in frozen_bn}
    averaged: set[int] = set()
    with torch.no_grad():
        for _, bn in batchnorms(model):
            if id(bn) in frozen:
                continue
            for name in ("running_mean", "running_var"):
                buf = getattr(bn, name, None)
                if buf is not None and buf.is_floating_point():
                    td.all_reduce(buf, op=td.ReduceOp.SUM)
                    buf.div_(dist.world)
                    averaged.add(id(buf))
        tensors: list[Any] = [p.data for p in model.parameters()]
        tensors += [b for b in model.buffers() if id(b) not in averaged]
        for t in tensors:
            td.broadcast(t, src=0)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise TrainError(f"{name}={value!r} is not a number") from None
