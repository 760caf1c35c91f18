"""Zip archives as torch writes them: validated reading of stored records, and writing.

A torch checkpoint (``torch.save`` since 1.6) is a zip archive of *stored* (uncompressed)
records: ``<archive>/data.pkl`` (the pickled object, whose tensors refer to storages by key),
``<archive>/data/<key>`` (one storage's raw little-endian bytes, 64-byte aligned), and a few
small records (``version``, ``byteorder``, ...). Because records are stored, a tensor's bytes
are a plain byte range of the file: they can be copied without unpickling anything.

Reading validates what torch's own reader does not: only stored members (a deflated member
is a zip bomb waiting to happen), no duplicate names, sizes within the file, and the CRC-32 of
every record whose bytes are read whole.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from ckptsurgery.errors import FormatError
from ckptsurgery.io.checksums import crc32
from ckptsurgery.io.streams import CrcWriter, FileWindow

ZIP64_LIMIT = 0xFFFFFFFF  # a size or offset this large is written as a zip64 field
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header, signature first
_LOCAL_SIG = 0x04034B50
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_CENTRAL_SIG = 0x02014B50
_EOCD = struct.Struct("<IHHHHIIH")
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_UTF8 = 0x0800  # general purpose flag: names are UTF-8
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, so that the output is reproducible


@dataclass(frozen=True)
class Record:
    name: str
    header_offset: int  # of the local header, relative to the archive's start
    size: int
    crc: int


class ZipArchive:
    """The records of a zip archive at ``[base, base + length)`` of an open file.

    Only the central directory is read here; a record's data offset is found (and its local
    header checked) the first time it is asked for.
    """

    def __init__(self, f: BinaryIO, *, base: int, length: int, source: str) -> None:
        self.f = f
        self.base = base
        self.length = length
        self.source = source
        self.records: dict[str, Record] = {}
        try:
            with zipfile.ZipFile(FileWindow(f, base, length)) as zf:
                infos = zf.infolist()
        except Exception as e:  # zipfile fails on damaged input in many ways
            raise self.error(f"truncated or malformed torch zip archive ({_short(e)})") from None
        if any(i.filename.endswith("/constants.pkl") or "/code/" in i.filename for i in infos):
            raise self.error(
                "is a TorchScript archive (torch.jit.save), not a checkpoint; load it with "
                "torch.jit.load, save its state_dict() with torch.save, then retry"
            )
        for info in infos:
            name = info.filename
            if name in self.records:
                raise self.error(f"the archive holds two members named {name!r}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise self.error(
                    f"member {name!r} is compressed; torch stores every member uncompressed, "
                    "and a compressed member could hide a zip bomb, so it is refused"
                )
            if info.flag_bits & 0x1:
                raise self.error(f"member {name!r} is encrypted")
            if (
                info.file_size != info.compress_size
                or info.header_offset < 0
                or info.header_offset + _LOCAL.size + info.file_size > length
            ):
                raise self.error(f"member {name!r} claims more bytes than the file holds")
            self.records[name] = Record(name, info.header_offset, info.file_size, info.CRC)
        self._data_offsets: dict[str, int] = {}

    def error(self, message: str) -> FormatError:
        return FormatError(f"{self.source}: {message}")

    def data_offset(self, name: str) -> int:
        """Absolute file offset of the record's first data byte."""
        found = self._data_offsets.get(name)
        if found is not None:
            return found
        rec = self.records[name]
        self.f.seek(self.base + rec.header_offset)
        head = self.f.read(_LOCAL.size)
        if len(head) != _LOCAL.size:
            raise self.error(f"the local header of {name!r} is cut short (truncated file?)")
        fields = _LOCAL.unpack(head)
        if fields[0] != _LOCAL_SIG:
            raise self.error(f"member {name!r} has no local header where the directory says")
        name_len, extra_len = int(fields[9]), int(fields[10])
        raw_name = self.f.read(name_len)
        if raw_name.decode("utf-8", "replace") != name and raw_name.decode("cp437") != name:
            raise self.error(f"member {name!r} is named differently in its local header")
        start = rec.header_offset + _LOCAL.size + name_len + extra_len
        if start + rec.size > self.length:
            raise self.error(f"member {name!r} runs past the end of the file (truncated?)")
        self._data_offsets[name] = self.base + start
        return self.base + start

    def read(self, name: str) -> bytes:
        """A (small) record's bytes, CRC-checked."""
        rec = self.records[name]
        self.f.seek(self.data_offset(name))
        data = self.f.read(rec.size)
        if len(data) != rec.size:
            raise self.error(f"member {name!r} is cut short (truncated file?)")
        self.check_crc(name, crc32(data))
        return data

    def check_crc(self, name: str, crc: int) -> None:
        if crc != self.records[name].crc:
            raise self.crc_error(name)

    def crc_error(self, name: str) -> FormatError:
        return self.error(
            f"member {name!r} fails its CRC-32 check: the file is corrupt (re-download it)"
        )


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


class ZipWriter:
    """Writes stored records, each 64-byte aligned as torch aligns them, then the directory.

    Records are written one after another straight to ``f`` (which must be seekable: a
    record's CRC-32 is patched into its local header once its data has passed). zip64 fields
    are used where a size or offset needs them (or everywhere with ``force_zip64``).
    """

    def __init__(self, f: BinaryIO, *, align: int = 64, force_zip64: bool = False) -> None:
        self.f = f
        self.align = align
        self.force_zip64 = force_zip64
        self.start = f.tell()
        self._pos = 0  # where the next record starts, relative to ``start`` (tell() is slow)
        self._central: list[tuple[bytes, int, int, int]] = []  # name, offset, size, crc
        self.last_data = (0, 0)  # (begin, length) in ``f`` of the last record's data

    def add(self, name: str, data: bytes) -> None:
        self.add_stream(name, len(data), lambda f: f.write(data) or 0, crc=crc32(data))

    def add_stream(
        self,
        name: str,
        size: int,
        produce: Callable[[BinaryIO], int],
        *,
        crc: int | None = None,
    ) -> None:
        """A record of ``size`` bytes that ``produce(f)`` writes (returning how many).

        Without ``crc``, the CRC-32 is computed from what ``produce`` writes; with it, the
        caller vouches for the bytes (a record copied unchanged from a verified source).
        """
        f = self.f
        raw_name = name.encode("utf-8")
        offset = self._pos
        zip64 = self.force_zip64 or size >= ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 0x0001, 16, size, size) if zip64 else b""
        unpadded = offset + _LOCAL.size + len(raw_name) + len(extra) + 4
        pad = -unpadded % self.align
        # torch's own writer pads with an extra field tagged "FB"; readers skip unknown ones
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        size32 = 0xFFFFFFFF if zip64 else size
        header = (
            _LOCAL.pack(
                _LOCAL_SIG,
                45 if zip64 else 20,
                _UTF8,
                0,
                0,
                _DOS_DATE,
                crc or 0,
                size32,
                size32,
                len(raw_name),
                len(extra),
            )
            + raw_name
            + extra
        )
        f.write(header)
        known = crc is not None  # then already in the local header: no seek back to patch it
        if crc is None:
            tracker = CrcWriter(f)
            produce(tracker)  # type: ignore[arg-type]
            crc = tracker.crc
            written = tracker.count
        else:
            written = produce(f)
        if written != size:
            raise FormatError(f"zip record {name!r}: expected {size} bytes, got {written}")
        if not known:
            end = f.tell()
            f.seek(self.start + offset + 14)
            f.write(struct.pack("<I", crc))
            f.seek(end)
        self._pos = offset + len(header) + size
        self._central.append((raw_name, offset, size, crc))
        self.last_data = (self.start + offset + len(header), size)

    def crcs(self) -> dict[str, int]:
        """Each record written so far: name -> the CRC-32 of its data."""
        return {raw.decode("utf-8"): crc for raw, _, _, crc in self._central}

    def close(self) -> int:
        """Write the central directory and end records; return the archive's size."""
        f = self.f
        cd_start = f.tell() - self.start
        for raw_name, offset, size, crc in self._central:
            fields: list[int] = []
            if self.force_zip64 or size >= ZIP64_LIMIT:
                fields += [size, size]
            if self.force_zip64 or offset >= ZIP64_LIMIT:
                fields.append(offset)
            extra = b""
            if fields:
                extra = struct.pack(f"<HH{len(fields)}Q", 0x0001, 8 * len(fields), *fields)
            big_size = self.force_zip64 or size >= ZIP64_LIMIT
            big_offset = self.force_zip64 or offset >= ZIP64_LIMIT
            version = 45 if fields else 20
            f.write(
                _CENTRAL.pack(
                    _CENTRAL_SIG,
                    version,
                    version,
                    _UTF8,
                    0,
                    0,
                    _DOS_DATE,
                    crc,
                    0xFFFFFFFF if big_size else size,
                    0xFFFFFFFF if big_size else size,
                    len(raw_name),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    0xFFFFFFFF if big_offset else offset,
                )
                + raw_name
                + extra
            )
        cd_end = f.tell() - self.start
        count, cd_size = len(self._central), cd_end - cd_start
        if self.force_zip64 or count >= 0xFFFF or cd_start >= ZIP64_LIMIT or cd_size >= ZIP64_LIMIT:
            f.write(
                _EOCD64.pack(
                    0x06064B50, _EOCD64.size - 12, 45, 45, 0, 0, count, count, cd_size, cd_start
                )
            )
            f.write(_LOCATOR64.pack(0x07064B50, 0, cd_end, 1))
            f.write(
                _EOCD.pack(
                    0x06054B50,
                    0,
                    0,
                    min(count, 0xFFFF),
                    min(count, 0xFFFF),
                    min(cd_size, 0xFFFFFFFF),
                    min(cd_start, 0xFFFFFFFF),
                    0,
                )
            )
        else:
            f.write(_EOCD.pack(0x06054B50, 0, 0, count, count, cd_size, cd_start, 0))
        return f.tell() - self.start
