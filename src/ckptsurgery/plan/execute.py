"""The one executor: a plan carried out one output tensor at a time.

:class:`PlanSource` shows a plan's output as a :class:`~ckptsurgery.io.Checkpoint` whose
tensors are made only when asked for, so every writer (safetensors, torch zip, shards) and
the in-memory loader take any plan alike:

- a ``copy`` hands the source's byte range straight to the writer (no torch, no copy of the
  tensor in memory: the source streams it through a small buffer);
- a ``cast`` streams the source bytes through :class:`~ckptsurgery.plan.ops.CastWriter`, a
  chunk at a time;
- a ``mean`` / ``weighted-sum`` of floats is summed with numpy from its inputs' bytes (maps
  of the files where they allow; :mod:`ckptsurgery.plan.numeric`), with no torch; an adapter
  (or a sum of other dtypes) is computed with torch, holding one input at a time. When the
  writer says what it will ask for next, a helper thread computes the next output while
  this one is written (:class:`ReadAhead`), so the sums and the writes overlap on two cores.

Peak memory is thus about the tensor being written and the next one with its inputs (maps of
the page cache, or copies up to ``numeric.HOLD`` bytes, beyond which inputs are added to an
accumulator one at a time), plus fixed buffers, whatever the checkpoint's size.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Generic, TypeVar, cast

from ckptsurgery.io import Checkpoint, WriteResult, write_checkpoint
from ckptsurgery.io.base import RecordCheck
from ckptsurgery.keygroups import group_keys
from ckptsurgery.plan import numeric, ops
from ckptsurgery.plan.model import Entry, Plan
from ckptsurgery.plan.ops import CastWriter, evaluate

if TYPE_CHECKING:
    import torch

    from ckptsurgery.io.writer import Metadata

__all__ = ["PlanSource", "execute", "materialize"]

T = TypeVar("T")


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
        self._ahead: ReadAhead[bytes | memoryview] | None = None
        # A source's readers keep state of their own (a file's position, records located on
        # first use): the read-ahead thread and the writer take turns with each source.
        self._locks = [threading.Lock() for _ in self.sources]

    def _direct(self, e: Entry) -> list[Callable[[], torch.Tensor]]:
        view = e.op.name in ops.READS_ONLY  # its inputs may be read-only maps of the files
        return [partial(self._read, r.source, r.key, view=view) for r in e.inputs]

    def _read(self, i: int, key: str, *, view: bool = False) -> torch.Tensor:
        with self._locks[i]:
            src = self.sources[i]
            return src.tensor_view(key) if view else src.tensor(key)

    def _raw(self, i: int, key: str) -> bytes | memoryview:
        with self._locks[i]:
            return self.sources[i].raw_bytes(key)

    def _view(self, i: int, key: str) -> bytes | memoryview:
        with self._locks[i]:
            return self.sources[i].bytes_view(key)

    def _compute(self, e: Entry) -> torch.Tensor:
        return evaluate(e.op, self._direct(e), e.input_infos, name=e.name)

    def _compute_bytes(self, e: Entry) -> bytes | memoryview:
        """The bytes of a computed output: a weighted sum of floats straight from its inputs'
        bytes with numpy (no torch), anything else through torch."""
        if by_numpy(e):
            return numeric.weighted_sum_bytes(
                [partial(self._view, r.source, r.key) for r in e.inputs],
                [i.dtype for i in e.input_infos],
                e.op.param("weights"),
                accumulate=ops.accumulator([i.dtype for i in e.input_infos]),
                dtype=e.info.dtype,
                numel=e.info.numel,
            )
        from ckptsurgery.io.memory import tensor_bytes

        return tensor_bytes(self._compute(e))

    def will_read(self, names: Sequence[str]) -> None:
        """Compute the computed tensors among ``names`` ahead, in that order, on a helper
        thread: the next one is read and computed while the writer writes this one."""
        if self._ahead is not None:
            self._ahead.stop()
        entries = [self._entries[name] for name in names]
        jobs = [(e.name, partial(self._compute_bytes, e)) for e in entries if _made_whole(e)]
        self._ahead = ReadAhead(jobs) if jobs else None

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.stop()
            self._ahead = None

    def tensor(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        self._compare(e)
        return self._compute(e)

    def raw_bytes(self, name: str) -> bytes | memoryview:
        e = self._entries[name]
        self._compare(e)
        if e.op.is_copy:
            ref = e.inputs[0]
            return self._raw(ref.source, ref.key)
        compute = partial(self._compute_bytes, e)
        if self._ahead is not None and _made_whole(e):
            return self._ahead.take(name, compute)
        return compute()

    def write_data(self, name: str, f: BinaryIO) -> int:
        e = self._entries[name]
        ref = e.inputs[0]
        src = self.sources[ref.source]
        if e.op.is_copy:
            self._compare(e)
            with self._locks[ref.source]:
                return src.write_data(ref.key, f)  # a source may stream through a small buffer
        if e.op.name == "cast":
            if self._cast_buffer is None:
                self._cast_buffer = bytearray(ops.CAST_CHUNK)
            sink = CastWriter(f, e.source_dtype, e.info.dtype, buffer=self._cast_buffer)
            with self._locks[ref.source]:
                src.write_data(ref.key, cast(BinaryIO, sink))
            sink.close()
            return sink.written
        return super().write_data(name, f)

    def record_crc(self, name: str) -> int | None:
        e = self._entries[name]
        if e.op.is_copy:
            return self.sources[e.inputs[0].source].record_crc(e.inputs[0].key)
        return None

    def tapped_crcs(self, names: Iterable[str]) -> dict[str, Callable[[], int]]:
        per_source: dict[int, dict[str, list[str]]] = {}  # source -> key -> output names
        for name in names:
            e = self._entries[name]
            if e.op.is_copy:
                ref = e.inputs[0]
                per_source.setdefault(ref.source, {}).setdefault(ref.key, []).append(name)
        out: dict[str, Callable[[], int]] = {}
        for i, keys in per_source.items():
            for key, crc in self.sources[i].tapped_crcs(keys).items():
                out.update((name, crc) for name in keys[key])
        return out

    def check_jobs(self, names: Iterable[str]) -> list[RecordCheck]:
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
        first = memoryview(self._raw(ref.source, ref.key)).cast("B")
        for other in e.compare:
            if memoryview(self._raw(other.source, other.key)).cast("B") != first:
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


def by_numpy(e: Entry) -> bool:
    """Whether ``e`` is computed with numpy: a weighted sum of floats numpy holds."""
    return e.op.name in ("mean", "weighted-sum") and numeric.summable(
        [i.dtype for i in e.input_infos], e.info.dtype
    )


def _made_whole(e: Entry) -> bool:
    """Whether the writer asks for ``e`` as a whole tensor (copies and casts stream)."""
    return not (e.op.is_copy or e.op.name == "cast")


class ReadAhead(Generic[T]):
    """Makes tensors on a helper thread, one ahead of the caller, in a known order.

    ``jobs`` are ``(key, fetch)`` pairs in the order they will be taken. :meth:`take` returns
    the tensor fetched for ``key`` when it is the next one, or calls its own ``fetch`` when
    the caller asks out of order (the read-ahead then stops). At most one tensor is made
    ahead, so memory grows by one tensor, not by the checkpoint.
    """

    def __init__(self, jobs: Sequence[tuple[object, Callable[[], T]]]) -> None:
        self._jobs = list(jobs)
        self._next = 0  # index of the job the caller takes next
        self._ready = threading.Semaphore(0)  # a fetched result waits
        self._room = threading.Semaphore(1)  # the thread may fetch one more
        self._result: tuple[object, T | None, BaseException | None] | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for key, fetch in self._jobs:
            self._room.acquire()
            if self._stopped:
                return
            try:
                self._result = (key, fetch(), None)
            except BaseException as e:  # handed to the caller, who fetches again or raises
                self._result = (key, None, e)
            self._ready.release()

    def take(self, key: object, fetch: Callable[[], T]) -> T:
        if self._stopped or self._next >= len(self._jobs) or self._jobs[self._next][0] != key:
            self.stop()
            return fetch()
        self._ready.acquire()
        assert self._result is not None
        got, value, error = self._result
        self._result = None
        self._next += 1
        self._room.release()
        if error is not None:
            raise error
        assert got == key and value is not None
        return value

    def stop(self) -> None:
        """Let the thread end (a fetch under way finishes first) and drop what it holds."""
        if self._stopped:
            return
        self._stopped = True
        self._room.release()
        self._thread.join()
        self._result = None


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
    try:
        with _computing(plan):
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
    finally:
        src.close()
    return written, src.notes()


@contextlib.contextmanager
def _computing(plan: Plan) -> Iterator[None]:
    """While a plan with computed tensors is written:

    - torch's arithmetic leaves one core to the helper threads (reading ahead, reading back,
      hashing, flushing): elementwise sums and casts are bound by memory bandwidth, and
      torch's idle workers spin; on two cores one compute thread took a third less CPU time
      than two, and less wall time;
    - the objects alive before (torch's modules: hundreds of thousands) are left out of the
      garbage collector's full passes, which otherwise walked them all a few times per write.
    """
    if all(e.op.is_copy or by_numpy(e) for e in plan.entries):
        yield  # numpy's arithmetic runs on one thread
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, len(os.sched_getaffinity(0)) - 1)))
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        torch.set_num_threads(before)


def materialize(
    plan: Plan, ckpts: Sequence[Checkpoint]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The output of ``plan`` as a state dict in memory (tied outputs are one tensor), and the
    notes made while making it."""
    src = PlanSource(plan, ckpts)
    return src.state_dict(), src.notes()
