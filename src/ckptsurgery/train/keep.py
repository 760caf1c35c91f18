"""Keeping the K best checkpoints (``--keep-top-k K``) and averaging them (``--average-top-k``).

After each epoch the model is ranked by the validation metric (top-1, then lower loss; the
earlier epoch wins a tie). While fewer than K are kept, or when it beats the worst kept one, it
is written to ``OUTDIR/top_k/epoch-NNN.safetensors`` and the worst beyond K is deleted, as
timm's ``CheckpointSaver`` keeps its ``max_history`` best.

``--average-top-k`` writes their elementwise mean to ``OUTDIR/averaged.safetensors`` through
the project's streaming average (:func:`ckptsurgery.merge.average_files`: one tensor at a time,
read back and checked before it takes its name); the trainer then evaluates it. Integer buffers
(BatchNorm's ``num_batches_tracked``) are not averaged: the merge keeps the first (best) one's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FOLDER", "TopK", "average_kept"]

FOLDER = "top_k"

Key = tuple[float, ...]


@dataclass
class TopK:
    """The kept checkpoints of a run: ``(key, epoch)`` pairs, best first."""

    out: Path
    k: int
    kept: list[tuple[Key, int]] = field(default_factory=list)

    def path(self, epoch: int) -> Path:
        return self.out / FOLDER / f"epoch-{epoch:03d}.safetensors"

    def paths(self) -> list[Path]:
        """The kept files, best first."""
        return [self.path(epoch) for _, epoch in self.kept]

    def epochs(self) -> list[int]:
        return [epoch for _, epoch in self.kept]

    def offer(
        self,
        model: nn.Module,
        epoch: int,
        key: Key,
        *,
        metadata: Mapping[str, Any],
        write: bool = True,
    ) -> bool:
        """Keep ``model`` (evaluated at ``epoch`` with ``key``) if it ranks among the K best;
        returns whether it was kept. Under torchrun every process keeps the ranking and only
        rank 0 writes (``write``)."""
        from ckptsurgery.train.outputs import save_weights

        ranked = sorted([*self.kept, (key, epoch)], key=lambda e: (_neg(e[0]), e[1]))
        if (key, epoch) not in ranked[: self.k]:
            return False
        if write:
            (self.out / FOLDER).mkdir(parents=True, exist_ok=True)
            save_weights(model, self.path(epoch), metadata={**metadata, "rank_key": list(key)})
            for _, dropped in ranked[self.k :]:
                self.path(dropped).unlink(missing_ok=True)
        self.kept = ranked[: self.k]
        return True

    def to_state(self) -> list[list[Any]]:
        return [[list(key), epoch] for key, epoch in self.kept]

    @classmethod
    def from_state(cls, out: Path, k: int, state: list[list[Any]] | None) -> TopK:
        return cls(out, k, [(tuple(key), int(epoch)) for key, epoch in state or []])


def _neg(key: Key) -> tuple[float, ...]:
    # sorted() ascending on the negated key: the best first.
    return tuple(-v for v in key)


def average_kept(top: TopK, target: Path) -> Path:
    """Write the mean of the kept checkpoints to ``target`` (see the module docstring)."""
    from ckptsurgery.merge import average_files

    paths = top.paths()
    average_files(
        [str(p) for p in paths],
        str(target),
        force=True,
        provenance={"ckptsurgery.train": {"averaged_epochs": top.epochs()}},
    )
    return target
