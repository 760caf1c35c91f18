"""Write the seed corpora of the fuzz harnesses, from the project's fixtures and small state
dicts made here (fixed seeds: the same files every run, but for the random serialization id
torch.save writes into an archive).

    python fuzz/make_corpus.py [OUT]      # default: fuzz/corpus

``OUT/<harness>/`` holds one harness's seeds; ``OUT/_support/`` the files some harnesses
read beside their input (a DCP folder's data files, the shards of an index, a recipe's
source).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import shutil
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def _seed(out: Path, harness: str, data: bytes) -> None:
    folder = out / harness
    folder.mkdir(parents=True, exist_ok=True)
    (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)


def _state_dicts() -> list[Any]:
    import torch

    torch.manual_seed(0)
    w = torch.randn(4, 3)
    lin = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    return [
        {"w": w, "b": torch.arange(5, dtype=torch.int64)},
        {"weight": w, "tied": w, "half": torch.ones(2).half(), "bf": torch.zeros(3).bfloat16()},
        {"t": w.t(), "row": w[1], "empty": torch.empty(0, 3), "scalar": torch.tensor(7)},
        {"state_dict": lin.state_dict(), "epoch": 3, "name": "tiny"},
        {"model": {"student": {"a": torch.ones(2)}, "teacher": {"a": torch.zeros(2)}}},
        lin.state_dict(),
        {"p": torch.nn.Parameter(torch.ones(2)), "f8": torch.zeros(2).to(torch.float8_e4m3fn)},
        {"u": torch.tensor([1, 2], dtype=torch.uint8), "c": torch.zeros(2, dtype=torch.complex64)},
        {"\u00e9t\u00e9": torch.ones(1), "": torch.zeros(1), "a/../b": torch.ones(1)},
    ]


def _torch_save(obj: Any, *, zip_form: bool = True) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zip_form)
    return buf.getvalue()


def _data_pkl(archive: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        return zf.read(name)


def _legacy_pickle(data: bytes) -> bytes:
    """The object pickle of a legacy torch file (after the magic number, the protocol
    version and the system info, which are plain numbers and a dict)."""
    import pickletools

    f = io.BytesIO(data)
    for _ in range(3):
        pickle.load(f)  # written just now, by torch: an int, an int and a dict of ints
    start = f.tell()
    stops = [pos for op, _, pos in pickletools.genops(f) if op.name == "STOP"]
    return data[start : (stops[0] or 0) + 1]


def _safetensors_seeds() -> list[bytes]:
    import torch
    from safetensors.torch import save

    torch.manual_seed(0)
    seeds = [
        save({"a": torch.randn(2, 3), "b": torch.arange(4)}, metadata={"format": "pt"}),
        save({"h": torch.ones(3).half(), "z": torch.empty(0, 2), "s": torch.tensor(1.5)}),
        save({"\u00e9\U0001f600": torch.ones(1, dtype=torch.bool), "x" * 64: torch.zeros(2)}),
        save({}),
        save({"bf": torch.ones(2, 2).bfloat16(), "i8": torch.tensor([-1], dtype=torch.int8)}),
    ]
    # a tied pair as ckptsurgery writes it: one stored tensor and an alias in the metadata
    seeds.append(
        save({"w": torch.ones(2)}, metadata={"ckptsurgery.aliases": json.dumps({"v": "w"})})
    )
    seeds.append((FIXTURES / "tinynet.safetensors").read_bytes())
    return seeds


def _recipes() -> list[bytes]:
    texts = [(ROOT / "demo" / "digits_recipe.toml").read_text()]
    for test in sorted((ROOT / "tests").glob("*/test_*recipe*.py")):
        for block in re.findall(r'"""(.*?)"""', test.read_text(), flags=re.S):
            if "[[source]]" in block and "{" not in block:
                texts.append(block)
    texts.append(
        '[[source]]\npath = "model.safetensors"\nstrip_prefix = "module."\n\n'
        '[[source]]\npath = "other.safetensors"\nprefix = "head."\n\n'
        '[merge]\nmode = "average"\n\n[output]\npath = "out.safetensors"\n'
    )
    return [t.encode() for t in dict.fromkeys(texts)]


def make(out: Path) -> None:
    import torch

    if out.exists():
        shutil.rmtree(out)
    support = out / "_support"
    archives = [_torch_save(sd) for sd in _state_dicts()]
    archives.append(_torch_save({"x": torch.ones(2), "size": torch.Size([2, 3])}))
    for data in _safetensors_seeds():
        _seed(out, "safetensors", data)
        _seed(out, "torch_file", data)
    for data in archives:
        _seed(out, "torch_zip", data)
        _seed(out, "unpickler", _data_pkl(data))
    for sd in _state_dicts()[:4]:
        legacy = _torch_save(sd, zip_form=False)
        _seed(out, "torch_file", legacy)
        _seed(out, "unpickler", _legacy_pickle(legacy))  # storages as 6-tuples: Unsupported
    _seed(out, "torch_file", archives[-1])  # read by torch.load (torch.Size is not a stand-in)
    # the bundled torch fixtures (33-72 kB) go through open_checkpoint: the torch_zip
    # harness keeps to small archives, so that each of its executions stays cheap
    for fixture in sorted(FIXTURES.glob("*.pth*")) + sorted(FIXTURES.glob("*.ckpt")):
        _seed(out, "torch_file", fixture.read_bytes())

    # DCP: the data files of one save, and its .metadata in several pickle protocols
    from torch.distributed.checkpoint import state_dict_saver

    folder = support / "dcp"
    torch.manual_seed(0)
    state = {"model": {"w": torch.randn(4, 3), "b": torch.arange(5)}, "step": 42}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving as a single process"
        state_dict_saver.save(state, checkpoint_id=str(folder))
    meta = (folder / ".metadata").read_bytes()
    (folder / ".metadata").unlink()
    _seed(out, "dcp", meta)
    loaded = pickle.loads(meta)  # written just now, by torch
    for protocol in (0, 2, 4):
        _seed(out, "dcp", pickle.dumps(loaded, protocol=protocol))

    # a Hugging Face index beside two shards
    from safetensors.torch import save_file

    shards = support / "sharded"
    shards.mkdir(parents=True)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(shards / names[0]))
    save_file({"c": torch.arange(4)}, str(shards / names[1]))
    weight_map = {"a": names[0], "b": names[0], "c": names[1]}
    _seed(out, "index_json", json.dumps({"weight_map": weight_map}).encode())
    full = {"metadata": {"total_size": 52}, "weight_map": weight_map}
    _seed(out, "index_json", json.dumps(full, indent=2).encode())

    # recipes, beside the files they name
    recipes = support / "recipe"
    recipes.mkdir(parents=True)
    for name in ("mnist_cnn.pth", "model.safetensors", "other.safetensors"):
        (recipes / name).write_bytes(b"")
    for text in _recipes():
        _seed(out, "recipe", text)


if __name__ == "__main__":
    make(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "corpus")
