"""What every opened source offers: names, shapes and dtypes first, then one tensor at a time."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from ckptsurgery.io.dtypes import TensorInfo
from ckptsurgery.io.streams import CrcWriter

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False)
class RecordCheck:
    """A check of stored bytes against the checksums their source holds (a torch archive's
    record CRC-32s). Until it is run or settled, the source copies those records without
    checking them on the way.

    A writer either runs it on a helper thread beside the copy (``run()`` raises
    :class:`~ckptsurgery.errors.FormatError` for a corrupt record), or, when it verifies its
    output against those very checksums, settles it: ``settle(True)`` once the output's bytes
    matched them (which proves the source's bytes too), ``settle(False)`` to hand the check
    back to the source's own checks on the way.
    """

    run: Callable[[], None]
    settle: Callable[[bool], None]

    def __call__(self) -> None:
        self.run()


class Checkpoint(ABC):
    """One opened source. Use as a context manager, or call :meth:`close`."""

    path: Path
    format: str
    key: str | None = None  # the nested state dict's path inside the file, if any
    other_entries: dict[str, str]  # other top-level entries: name -> type name
    metadata: dict[str, str]  # safetensors __metadata__ (empty for torch files)
    infos: dict[str, TensorInfo]  # every name, tied aliases included, in file order
    aliases: dict[str, str]  # tied name -> the name whose storage it shares

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    @abstractmethod
    def raw_bytes(self, name: str) -> bytes | memoryview:
        """The tensor's bytes, contiguous and little-endian, exactly as stored."""

    @abstractmethod
    def tensor(self, name: str) -> torch.Tensor:
        """The tensor itself (read from disk on demand where the format allows)."""

    def tensor_view(self, name: str) -> torch.Tensor:
        """The tensor, for reading only: a source on disk may hand out a read-only map of its
        bytes instead of a copy. Never write to it; it stays valid after :meth:`close`."""
        return self.tensor(name)

    def bytes_view(self, name: str) -> bytes | memoryview:
        """The tensor's bytes as :meth:`raw_bytes`, for reading only: a source on disk may
        hand out a read-only map of the file instead of a copy."""
        return self.raw_bytes(name)

    def write_data(self, name: str, f: BinaryIO) -> int:
        """Write the tensor's bytes (as :meth:`raw_bytes`) to ``f``; return how many.

        Sources that can copy straight from disk override this to stream through a small
        buffer, so that a tensor never has to fit in memory whole.
        """
        data = memoryview(self.raw_bytes(name)).cast("B")
        f.write(data)
        return len(data)

    def record_crc(self, name: str) -> int | None:
        """The CRC-32 of the bytes :meth:`write_data` writes, when known without computing it.

        A torch archive knows it for a tensor that is one storage record, copied whole: its
        :meth:`write_data` checks the bytes against it on the way, so a writer of a new
        archive may reuse it.
        """
        return None

    def data_crc(self, name: str) -> int:
        """The CRC-32 of the bytes :meth:`write_data` writes, computed from the data.

        Used to verify a file just written; sources that can hash their bytes in place (a
        memory map of the file) override this to skip the copy.
        """
        sink = CrcWriter(None)
        self.write_data(name, cast(BinaryIO, sink))
        return sink.crc

    def data_crcs(self, names: Iterable[str]) -> dict[str, int]:
        """:meth:`data_crc` of each name; sources on disk override this to hash many small
        tensors in one pass over the file instead of one read each."""
        return {name: self.data_crc(name) for name in names}

    def tapped_crcs(self, names: Iterable[str]) -> dict[str, Callable[[], int]]:
        """The CRC-32s of the bytes :meth:`write_data` writes for ``names`` that a pass over
        the source made anyway computes on its way (the digest of a safetensors file for the
        provenance, :func:`~ckptsurgery.io.streams.tap_digest`): name -> a call returning it,
        once that pass is done. A writer that verifies its output need not hash those bytes
        on their way out. Names no such pass covers are left out (the default: all)."""
        return {}

    def will_read(self, names: Sequence[str]) -> None:
        """A hint from a writer: it will now ask for the data of ``names``, in this order.

        A source that computes its tensors may read their inputs ahead on a helper thread;
        the default ignores it.
        """
        return None

    def data_spans(self, names: Iterable[str]) -> dict[str, tuple[int, int]]:
        """Where the bytes of each of ``names`` lie in the file, as ``(begin, length)``, for
        those stored as one contiguous byte range of a single file (others are left out).

        A writer that hashed a tensor's bytes at a place of the output checks here that the
        file's own header points at that place.
        """
        return {}

    def check_jobs(self, names: Iterable[str]) -> list[RecordCheck]:
        """Checks of the stored bytes of ``names`` (a torch archive's CRC-32s) for a helper
        thread: the source then skips those checks while copying the bytes.

        A writer runs them beside its copy (:func:`~ckptsurgery.io.streams.in_background`)
        and joins them after its fsync, before it commits the output; or it settles them
        (:class:`RecordCheck`) when its verification compares the output with the same
        checksums.
        """
        return []

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, materialised; tied names are the same tensor object."""
        out: dict[str, torch.Tensor] = {}
        for name in self.infos:
            canon = self.canonical(name)
            out[name] = out[canon] if canon in out else self.tensor(canon)
        return out

    @property
    def total_params(self) -> int:
        return sum(i.numel for n, i in self.infos.items() if n not in self.aliases)

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for n, i in self.infos.items() if n not in self.aliases)

    def close(self) -> None:  # noqa: B027 - sources that hold no resource need no closing
        """Release the file or memory this source holds."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
