"""Recognise a checkpoint's format from its first bytes, never from its extension alone, and
check the paths a source gives or names before anything is opened."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

from ckptsurgery._types import PathLike
from ckptsurgery.errors import FormatError, SourceError

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch-zip"
TORCH_LEGACY = "torch-legacy"
SHARDED_INDEX = "sharded-index"  # a Hugging Face *.index.json (weight_map -> shard files)
SHARDED = "sharded"  # what a sharded checkpoint reports as its format
DCP = "dcp"  # a torch.distributed.checkpoint folder

# torch < 1.6 starts its files with this pickled magic number (protocol 2, LONG1 of 10 bytes).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def check_source_path(path: PathLike) -> Path:
    """A readable regular file, or a clear error (before anything is opened)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise SourceError(f"{str(p)!r} does not exist") from None
    except OSError as e:
        raise SourceError(f"{str(p)!r} cannot be read: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise SourceError(f"{str(p)!r} is a directory; give the checkpoint file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(
            f"{str(p)!r} is not a regular file (a FIFO or device?); refusing to read it"
        )
    if not os.access(p, os.R_OK):
        raise SourceError(f"{str(p)!r} is not readable (permission denied)")
    return p


def unsafe_file_name(name: str) -> str | None:
    """Why ``name``, a file name a checkpoint gives (a shard, a DCP data file), is not a plain
    name of a file in its folder; None when it is."""
    if not name:
        return "is empty"
    if "\x00" in name:
        return "holds a NUL byte"
    if "/" in name or "\\" in name:
        return "is a path, not a file name"
    if name in (".", ".."):
        return "names a folder"
    if os.path.isabs(name) or (len(name) >= 2 and name[1] == ":"):
        return "is an absolute path"
    return None


def detect_format(path: Path) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return TORCH_ZIP
    if head.startswith(_LEGACY_MAGIC):
        return TORCH_LEGACY
    # JSON text: a sharded checkpoint's index (checked when parsed). A safetensors length
    # field can start with "{" too, but its high bytes are zero (a header is under 100 MB).
    if head.lstrip(b" \t\r\n").startswith(b"{") and head[4:8] != b"\0\0\0\0":
        return SHARDED_INDEX
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        # A header opening with a byte-order mark is still meant as safetensors: the
        # safetensors reader then says exactly what is wrong with it.
        if head[8:].startswith((b"{", b"\xef\xbb\xbf{")) and n >= 2:
            return SAFETENSORS
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise FormatError(
            f"{str(path)!r} is a tar archive (the torch < 0.4 checkpoint format); "
            "load and re-save it with an old torch, then try again"
        )
    if size == 0:
        raise FormatError(f"{str(path)!r} is empty")
    if head.startswith(b"\x80") or head.startswith(b"\x1f\x8b"):
        raise FormatError(
            f"{str(path)!r} is not a torch checkpoint (a plain pickle or a gzip file?)"
        )
    raise FormatError(
        f"{str(path)!r} is not a recognised checkpoint: expected a torch file (zip or legacy) "
        "or safetensors"
    )
