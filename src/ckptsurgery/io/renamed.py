"""An opened checkpoint under new names, header only: what ``Rules.apply`` makes of a file.

Renaming a :class:`Checkpoint` reads nothing: the names, shapes and dtypes are the source's
under their new names, and a tensor is read from the source (under its old name) only when
asked for, so ``match`` on the result still reads headers alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, BinaryIO

from ckptsurgery.io.base import Checkpoint, RecordCheck

if TYPE_CHECKING:
    import torch

__all__ = ["RenamedCheckpoint"]


class RenamedCheckpoint(Checkpoint):
    """``source`` seen through ``renames`` (old -> new, in order); other names are left out.

    ``owns`` closes ``source`` with this view (the view was opened from a path for the caller).
    """

    def __init__(
        self, source: Checkpoint, renames: Iterable[tuple[str, str]], *, owns: bool = False
    ) -> None:
        self.source = source
        self._owns = owns
        self.path = source.path
        self.format = source.format
        self.key = source.key
        self.other_entries = dict(source.other_entries)
        self.metadata = dict(source.metadata)
        self._old: dict[str, str] = {}
        self.infos = {}
        for old, new in renames:
            self._old[new] = old
            self.infos[new] = source.infos[old]
        self.aliases = _renamed_aliases(source, self._old)

    def tensor(self, name: str) -> torch.Tensor:
        return self.source.tensor(self._old[name])

    def raw_bytes(self, name: str) -> bytes | memoryview:
        return self.source.raw_bytes(self._old[name])

    def bytes_view(self, name: str) -> bytes | memoryview:
        return self.source.bytes_view(self._old[name])

    def tensor_view(self, name: str) -> torch.Tensor:
        return self.source.tensor_view(self._old[name])

    def write_data(self, name: str, f: BinaryIO) -> int:
        return self.source.write_data(self._old[name], f)

    def record_crc(self, name: str) -> int | None:
        return self.source.record_crc(self._old[name])

    def data_crc(self, name: str) -> int:
        return self.source.data_crc(self._old[name])

    def tapped_crcs(self, names: Iterable[str]) -> dict[str, Callable[[], int]]:
        new_of: dict[str, list[str]] = {}
        for new in names:
            new_of.setdefault(self._old[new], []).append(new)
        tapped = self.source.tapped_crcs(new_of)
        return {new: crc for old, crc in tapped.items() for new in new_of[old]}

    def check_jobs(self, names: Iterable[str]) -> list[RecordCheck]:
        return self.source.check_jobs(self._old[n] for n in names)

    def close(self) -> None:
        if self._owns:
            self.source.close()


def _renamed_aliases(source: Checkpoint, old_of: Mapping[str, str]) -> dict[str, str]:
    """Ties under the new names: each kept name of a tie group points at the group's first
    kept name (which may not be the source's canonical one, when that one was left out)."""
    first: dict[str, str] = {}  # the source's canonical name -> first kept new name
    aliases: dict[str, str] = {}
    for new, old in old_of.items():
        canon = source.canonical(old)
        head = first.setdefault(canon, new)
        if head != new:
            aliases[new] = head
    return aliases
