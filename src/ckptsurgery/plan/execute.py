"""The one executor: a plan carried out one output tensor at a time.

:class:`PlanSource` shows a plan's output as a :class:`~ckptsurgery.io.Checkpoint` whose
tensors are made only when asked for, so every writer (safetensors, torch zip, shards) and
the in-memory loader take any plan alike:

- a ``copy`` hands the source's byte range straight to the writer (no torch, no copy of the
  tensor in memory: the source streams it through a small buffer);
- a ``cast`` streams the source bytes through :class:`~ckptsurgery.plan.ops.CastWriter`, a
  chunk at a time;
- a ``mean`` / ``weighted-sum`` holds its accumulator and one input at a time.

Peak memory is thus the largest output tensor (its accumulator, for a mean) plus fixed
buffers, whatever the checkpoint's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from ckptsurgery.io import Checkpoint, WriteResult, write_checkpoint
from ckptsurgery.keygroups import group_keys
from ckptsurgery.plan import ops
from ckptsurgery.plan.model import Entry, Plan
from ckptsurgery.plan.ops import CastWriter, evaluate

if TYPE_CHECKING:
    import torch

    from ckptsurgery.io.writer import Metadata

__all__ = ["PlanSource", "execute", "materialize"]


class PlanSource(Checkpoint):
    """The output of ``plan`` over the opened sources ``ckpts`` (in the plan's order)."""

    def __init__(self, plan: Plan, ckpts: Sequence[Checkpoint]) -> None:
        self.plan = plan
        self.sources = list(ckpts)
        self.path = Path("plan")
        self.format = plan.mode
        self.metadata = {}
        self.other_entries = {}
        self.infos = plan.infos
        self.aliases = dict(plan.ties)
        self._entries = {e.name: e for e in plan.entries}
        self._compared: set[str] = set()
        self.disagree: list[str] = []  # compared outputs whose sources held other values
        self._cast_buffer: bytearray | None = None  # shared by the casts, made on first use

    def _fetchers(self, e: Entry) -> list[Callable[[], torch.Tensor]]:
        return [partial(self.sources[r.source].tensor, r.key) for r in e.inputs]

    def tensor(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        self._compare(e)
        return evaluate(e.op, self._fetchers(e), e.input_infos)

    def raw_bytes(self, name: str) -> bytes | memoryview:
        e = self._entries[name]
        if e.op.is_copy:
            self._compare(e)
            ref = e.inputs[0]
            return self.sources[ref.source].raw_bytes(ref.key)
        from ckptsurgery.io.memory import tensor_bytes

        return tensor_bytes(self.tensor(name))

    def write_data(self, name: str, f: BinaryIO) -> int:
        e = self._entries[name]
        ref = e.inputs[0]
        src = self.sources[ref.source]
        if e.op.is_copy:
            self._compare(e)
            return src.write_data(ref.key, f)  # a source may stream through a small buffer
        if e.op.name == "cast":
            if self._cast_buffer is None:
                self._cast_buffer = bytearray(ops.CAST_CHUNK)
            sink = CastWriter(f, e.source_dtype, e.info.dtype, buffer=self._cast_buffer)
            src.write_data(ref.key, cast(BinaryIO, sink))
            sink.close()
            return sink.written
        return super().write_data(name, f)

    def record_crc(self, name: str) -> int | None:
        e = self._entries[name]
        if e.op.is_copy:
            return self.sources[e.inputs[0].source].record_crc(e.inputs[0].key)
        return None

    def check_jobs(self, names: Iterable[str]) -> list[Callable[[], None]]:
        # The sources check the records that are streamed (copies and casts) on a helper
        # thread, beside the copy; what is read as tensors is checked as it is read.
        per_source: dict[int, list[str]] = {}
        for name in names:
            e = self._entries[name]
            if e.op.is_copy or e.op.name == "cast":
                per_source.setdefault(e.inputs[0].source, []).append(e.inputs[0].key)
        return [job for i, keys in per_source.items() for job in self.sources[i].check_jobs(keys)]

    def _compare(self, e: Entry) -> None:
        """Compare a copied tensor with the other sources' versions of it, once."""
        if not e.compare or e.name in self._compared:
            return
        self._compared.add(e.name)
        ref = e.inputs[0]
        first = memoryview(self.sources[ref.source].raw_bytes(ref.key)).cast("B")
        for other in e.compare:
            if memoryview(self.sources[other.source].raw_bytes(other.key)).cast("B") != first:
                self.disagree.append(e.name)
                return

    def notes(self) -> list[str]:
        """After the tensors were made: the copied tensors the sources disagree on."""
        if not self.disagree:
            return []
        n = len(self.disagree)
        first = self.plan.sources[0].path
        return [
            f"the sources hold different values for {n} integer or bool "
            f"tensor{'s' if n != 1 else ''} ({', '.join(group_keys(self.disagree))}); "
            f"taken from {first}, the first"
        ]


def execute(
    plan: Plan,
    ckpts: Sequence[Checkpoint],
    out: Path,
    *,
    fmt: str,
    metadata: Metadata | None = None,
    overwrite: bool = True,
    max_shard_size: int | None = None,
    progress: Callable[[int, int], None] | bool | None = None,
    verify: bool = True,
) -> tuple[WriteResult, list[str]]:
    """Write the output of ``plan`` over ``ckpts`` to ``out`` (already checked) atomically;
    returns what was written and the notes made while writing."""
    src = PlanSource(plan, ckpts)
    options: dict[str, Any] = {"progress": progress} if progress is not None else {}
    written = write_checkpoint(
        out,
        src,
        [(n, n) for n in plan.names],
        fmt=fmt,
        metadata=metadata,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        verify=verify,
        **options,
    )
    return written, src.notes()


def materialize(
    plan: Plan, ckpts: Sequence[Checkpoint]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The output of ``plan`` as a state dict in memory (tied outputs are one tensor), and the
    notes made while making it."""
    src = PlanSource(plan, ckpts)
    return src.state_dict(), src.notes()
