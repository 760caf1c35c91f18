"""The fuzz harnesses (fuzz/harnesses.py) over their seeds and every regression input.

Each input either parses or is refused with a CheckpointError; the unpickler harnesses also
fail on an import or a call outside the allow-list. tests/fuzz_corpus/<harness>/ holds the
inputs that once crashed a parser (minimised), so every fixed crash stays fixed.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "fuzz"))

import harnesses  # noqa: E402
import make_corpus  # noqa: E402

REGRESSIONS = ROOT / "tests" / "fuzz_corpus"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "corpus"
    make_corpus.make(out)
    harnesses.SUPPORT = out / "_support"
    return out


def _inputs(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


@pytest.mark.parametrize("name", sorted(harnesses.HARNESSES))
def test_seeds_parse(corpus: Path, name: str) -> None:
    """The seeds are valid files: each parses (the harness accepts a refusal too, so this
    test checks that the parsers really read them)."""
    seeds = _inputs(corpus / name)
    assert seeds, name
    for seed in seeds:
        harnesses.HARNESSES[name](seed.read_bytes())


@pytest.mark.parametrize("name", sorted(harnesses.HARNESSES))
def test_regression_inputs(corpus: Path, name: str) -> None:
    for path in _inputs(REGRESSIONS / name):
        harnesses.HARNESSES[name](path.read_bytes())


def test_every_regression_folder_is_a_harness() -> None:
    assert {p.name for p in REGRESSIONS.iterdir()} <= set(harnesses.HARNESSES)


def _refusal(fn: Callable[[], object]) -> str:
    from ckptsurgery.errors import CheckpointError
    from ckptsurgery.io.torchpickle import Unsupported

    with pytest.raises((CheckpointError, Unsupported)) as e:
        fn()
    return str(e.value)


def test_a_huge_memo_index_is_refused_before_the_unpickler_allocates() -> None:
    from ckptsurgery.io.torchpickle import load_refs, pickle_hazard

    assert "memo" in _refusal(lambda: load_refs(b"\x80\x02]r\xff\xff\xff\xff."))
    assert "memo" in str(pickle_hazard(b"(lp99999999999\n.", protocol=2))
    for protocol in range(6):  # what picklers write passes, whatever the protocol
        data = pickle.dumps({str(i): [i, str(i), (i,)] for i in range(300)}, protocol=protocol)
        big = pickle.dumps([b"x" * 100_000, "y" * 70_000, [1.5] * 20_000], protocol=protocol)
        for blob in (data, big):
            assert pickle_hazard(blob, protocol=max(protocol, 2)) is None, protocol


@pytest.mark.parametrize("op", [b"\x96", b"\x8e"], ids=["BYTEARRAY8", "BINBYTES8"])
def test_an_opcode_across_a_frame_end_never_reaches_the_c_unpickler(op: bytes) -> None:
    """The C unpickler fails on it with a bogus MemoryError, freeing a bytearray that is
    still exported (CPython 3.11); our readers refuse it first."""
    from ckptsurgery.io.torchpickle import load_refs, pickle_hazard

    data = b"\x80\x04\x95" + (5).to_bytes(8, "little") + op + (3).to_bytes(8, "little")
    data += b"abcq\x01s(Rt."
    assert "frame" in str(pickle_hazard(data, protocol=5))
    assert "protocol" in _refusal(lambda: load_refs(b"\x80\x02" + data[2:]))


class _Import:
    def __reduce__(self) -> tuple[object, ...]:
        import os

        return (os.getcwd, ())


def test_the_guard_catches_an_unpickler_that_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    """The unpickler harness would notice a restricted unpickler that lets a global through."""
    from ckptsurgery.io import torchpickle

    def lax(self: pickle.Unpickler, module: str, name: str) -> object:
        return pickle.Unpickler.find_class(self, module, name)

    monkeypatch.setattr(torchpickle._Unpickler, "find_class", lax)
    monkeypatch.delitem(sys.modules, "shelve", raising=False)
    data = pickle.dumps(_Import(), protocol=2)
    with pytest.raises(harnesses.Violation, match="getcwd"):
        harnesses.unpickler(data)
    data = b"\x80\x02cshelve\nShelf\n."
    with pytest.raises(harnesses.Violation, match="shelve"):
        harnesses.unpickler(data)


def test_the_guard_catches_a_changed_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptsurgery.io import torchpickle

    def tamper(self: pickle.Unpickler, module: str, name: str) -> object:
        found = torchpickle._GLOBALS[module, name]
        torchpickle._rebuild_parameter.__defaults__ = (1,)  # as a BUILD opcode could
        return found

    monkeypatch.setattr(torchpickle._Unpickler, "find_class", tamper)
    try:
        with pytest.raises(harnesses.Violation, match="changed"):
            harnesses.unpickler(b"\x80\x02ccollections\nOrderedDict\n)R.")
    finally:
        torchpickle._rebuild_parameter.__defaults__ = None
        harnesses._baseline.clear()


def _storage_pickle(storage_class: str) -> bytes:
    """{"w": a 2-element tensor of ``storage_class``}, as torch.save pickles it."""
    return (
        b"\x80\x02}X\x01\x00\x00\x00w"
        b"ctorch._utils\n_rebuild_tensor_v2\n"
        b"((X\x07\x00\x00\x00storagectorch\n" + storage_class.encode() + b"\n"
        b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQK\x00K\x02\x85K\x01\x85\x89"
        b"ccollections\nOrderedDict\n)RtRs."
    )


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (REGRESSIONS / "unpickler").glob("build-*"))
)
def test_a_pickle_cannot_change_how_the_next_is_read(name: str) -> None:
    """BUILD sets attributes on what is on the stack: on the shared stand-ins, it once
    retyped every later file's float32 (or float16) storages."""
    from ckptsurgery.io.torchpickle import load_refs

    _refusal(lambda: load_refs((REGRESSIONS / "unpickler" / name).read_bytes()))
    for cls, dtype in (("FloatStorage", "float32"), ("HalfStorage", "float16")):
        ref = load_refs(_storage_pickle(cls)).root["w"]  # type: ignore[index]
        assert (ref.dtype, ref.nbytes) == (dtype, 8 if dtype == "float32" else 4)


def test_a_pickle_cannot_resize_a_storage_once_its_tensors_are_checked() -> None:
    """A storage's size is checked against its tensors when they are rebuilt, and against its
    record later: BUILD on the storage in between would make a tensor read past its record."""
    from ckptsurgery.io.torchpickle import load_refs

    data = _storage_pickle("FloatStorage")
    # memoise the storage, then after the dict is built: fetch it and BUILD numel=0 on it
    data = data.replace(b"K\x02tQ", b"K\x02tQq\x05")
    data = data[:-1] + b"h\x05}X\x05\x00\x00\x00numelK\x00sb0."
    _refusal(lambda: load_refs(data))


def test_dcp_checks_every_chunk_before_allocating_the_tensor(corpus: Path) -> None:
    """A tensor split along a later dimension is assembled in memory: its shape (metadata
    alone) once sized the allocation before any chunk was looked at -- a claimed
    [2**20, 2**20] tensor asked numpy for 8 TB. The chunks are checked first now."""
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    from ckptsurgery.errors import FormatError

    seed = next(p for p in sorted((corpus / "dcp").iterdir()))
    meta = pickle.loads(seed.read_bytes())  # written by torch in make_corpus: trusted
    n = 2**20
    entry = meta.state_dict_metadata["model.w"]
    entry.size = torch.Size([n, n])
    half = torch.Size([n, n // 2])
    entry.chunks = [
        ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=half),
        ChunkStorageMetadata(offsets=torch.Size([0, n // 2]), sizes=half),
    ]
    stored = meta.storage_data[MetadataIndex("model.w", torch.Size([0, 0]), 0)]
    meta.storage_data[MetadataIndex("model.w", torch.Size([0, n // 2]), 1)] = stored
    data = pickle.dumps(meta)  # as tests/fuzz_corpus/dcp/huge-tensor-in-two-column-chunks

    from ckptsurgery.io.dcp import DcpCheckpoint

    folder = harnesses._folder("dcp", "dcp")
    (folder / ".metadata").write_bytes(data)
    with DcpCheckpoint(folder, key=None) as ckpt, pytest.raises(FormatError, match="chunk"):
        ckpt.raw_bytes("w")  # the state dict is the nested "model"
