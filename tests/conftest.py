"""Shared helpers: tiny real checkpoints, bit-exact comparison on raw bytes, and the CLI run
in-process through click's CliRunner.

Test modules in every folder import these with ``from conftest import ...``: pytest puts this
folder on ``sys.path`` when it loads this file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

from ckptsurgery.cli import cli

REPO = Path(__file__).resolve().parents[1]
"""The repository's root: ``fixtures/``, ``demo/`` and ``benchmarks/`` are found from here."""
GOLDEN = Path(__file__).resolve().parent / "golden"


def raw(t: torch.Tensor) -> bytes:
    """A tensor's element bytes in C order: a ``uint8`` view of ``.contiguous()``.

    ``torch.equal`` calls NaN unequal to itself and -0.0 equal to 0.0; bytes do neither.
    """
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def from_bytes(data: list[int], dtype: torch.dtype, shape: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """A tensor of ``dtype`` whose storage is exactly the given little-endian bytes."""
    return torch.tensor(data, dtype=torch.uint8).view(dtype).reshape(shape)


def sample_state_dict() -> dict[str, torch.Tensor]:
    """Every dtype and layout the writers must carry bit-exactly, in a few hundred bytes."""
    g = torch.Generator().manual_seed(0)
    big = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    tied = torch.randn(5, 2, generator=g)

    f32 = torch.tensor([float("nan"), -0.0, 0.0, 1.5, 0.0, 0.0, float("inf")])
    bits = f32.view(torch.int32)
    bits[4] = 0x7FC12345  # a quiet NaN with a non-default payload
    bits[5] = 0x7F800001  # a signalling NaN (a copy through the x87 FPU would quiet it)
    bits[0] = -0x003FFFFF  # 0xFFC00001: a negative NaN with a payload

    return {
        # An odd-sized int8 first: everything after it starts at an odd offset in the data.
        "int8": torch.tensor([-128, -1, 127], dtype=torch.int8),
        "float32": f32,
        "float16": from_bytes([0x00, 0x80, 0x01, 0x7E, 0x00, 0x7C, 0x00, 0x3C], torch.float16),
        "bfloat16": from_bytes([0x00, 0x80, 0xC1, 0x7F, 0x81, 0xFF, 0x80, 0x3F], torch.bfloat16),
        "float8_e4m3fn": from_bytes([0x00, 0x80, 0x7F, 0xFF, 0x01, 0x38], torch.float8_e4m3fn),
        "float8_e5m2": from_bytes([0x00, 0x80, 0x7D, 0xFE, 0x7C, 0x3C], torch.float8_e5m2),
        "int64": torch.tensor([-(2**63), 2**63 - 1, 0], dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "complex64": torch.complex(
            torch.tensor([1.0, -0.0, float("nan")]), torch.tensor([-2.0, -0.0, 3.0])
        ),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.empty(0, 3),
        "transposed": torch.randn(3, 5, generator=g).t(),
        "slice": big[2:5],  # a view into a 40-element storage
        "column": big[:, 1],  # a strided view into the same storage
        "tied.a": tied,
        "tied.b": tied,
    }


class TinyNet(nn.Module):
    """A backbone (conv, BatchNorm with its int64 counter) and a head."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)


def assert_bit_exact(
    got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], *, ordered: bool = True
) -> None:
    assert (list(got) if ordered else sorted(got)) == (list(want) if ordered else sorted(want))
    for name, w in want.items():
        t = got[name]
        assert t.dtype == w.dtype, name
        assert tuple(t.shape) == tuple(w.shape), name
        assert raw(t) == raw(w), name


def assert_tied(sd: Mapping[str, torch.Tensor], a: str, b: str) -> None:
    assert sd[a].data_ptr() == sd[b].data_ptr()
    assert sd[a].untyped_storage().data_ptr() == sd[b].untyped_storage().data_ptr()


def safetensors_header(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header: dict[str, Any] = json.loads(data[8 : 8 + n])
    return header


def write_safetensors(path: Path, header: bytes | dict[str, Any], data: bytes = b"") -> Path:
    """A safetensors file by hand, so that malformed ones can be built."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.fixture
def sd() -> dict[str, torch.Tensor]:
    return sample_state_dict()


# -- modules and folders ----------------------------------------------------------------------


def import_source(
    folder: Path, name: str, source: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """Write ``source`` as ``folder/NAME.py`` and import it afresh, ``folder`` on ``sys.path``
    so that model specs find it too; for fixtures to ``yield from``, which forget it after."""
    (folder / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop(name, None)
    yield importlib.import_module(name)
    sys.modules.pop(name, None)


@pytest.fixture
def in_repo_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The repository's root as the current folder: ``fixtures/...`` paths and model specs such
    as ``fixtures.make_fixtures:tinynet`` resolve from there."""
    monkeypatch.chdir(REPO)
    return REPO


# -- the command line -------------------------------------------------------------------------


def cli_run(*args: str | Path, **kwargs: Any) -> Result:
    """``ckptsurgery ARGS...`` in-process, each argument ``str()``'d; stdout and stderr apart.

    ``kwargs`` go to ``CliRunner.invoke`` (``input=``, ``env=``, ...).
    """
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def no_traceback(result: Result) -> None:
    """The command ended on purpose: no traceback printed, nothing but SystemExit escaped."""
    for text in (result.stdout, result.stderr, result.output):
        assert "Traceback" not in text
    # the CLI exits on purpose; anything else escaping is a bug
    assert result.exception is None or isinstance(result.exception, SystemExit)


def cli_run_clean(*args: str | Path, **kwargs: Any) -> Result:
    """:func:`cli_run`, and :func:`no_traceback` on its result, whatever the exit code."""
    result = cli_run(*args, **kwargs)
    no_traceback(result)
    return result


def assert_ok(result: Result) -> None:
    """Exit 0, no traceback, and no ``Error:`` on stderr."""
    no_traceback(result)
    assert result.exit_code == 0, result.output
    assert "Error:" not in result.stderr, result.stderr


def assert_error(result: Result, *fragments: str, only_line: bool = True) -> str:
    """Exit 2, one ``Error:`` line on stderr holding ``fragments``, and on stdout nothing, or
    (with ``--json``) only the refusal's JSON object saying the same.

    With ``only_line`` (the default) that line is all of stderr: no hint below it.
    """
    no_traceback(result)
    assert result.exit_code == 2, result.output
    if result.stdout:
        refusal = json.loads(result.stdout)
        assert refusal["refused"] is True and refusal["exit_code"] == 2, refusal
        assert f"Error: {' '.join(refusal['message'].split())}" in result.stderr
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("Error: "), errors[0]
    if only_line:
        assert lines == errors, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# -- golden files -----------------------------------------------------------------------------


def check_golden(name: str, text: str) -> None:
    """``text`` equals ``golden/NAME``; with ``UPDATE_GOLDEN=1`` in the environment, write it."""
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} is missing; run with UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(encoding="utf-8")


# -- a fresh interpreter, without torch -------------------------------------------------------


def run_without_torch(body: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``body`` in a fresh interpreter in ``cwd``, then check that torch was never imported.

    ``body`` calls ``cli(*args)``: the CLI's ``main`` in-process, which must exit 0.
    """
    script = (
        textwrap.dedent(
            """
        import sys

        def cli(*args):
            from ckptsurgery.cli import main

            sys.argv = ["ckptsurgery", *args]
            try:
                main()
            except SystemExit as e:
                code = e.code
            else:
                code = 0
            assert code in (0, None), f"ckptsurgery {' '.join(args)} exited {code}"

        """
        )
        + textwrap.dedent(body)
        + textwrap.dedent(
            """
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not loaded, f"torch was imported: {loaded[:5]}"
        print("TORCH-FREE")
        """
        )
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TORCH-FREE" in proc.stdout
    return proc


def garbage_data(path: Path) -> Path:
    """Overwrite every tensor record of a torch zip with other bytes (same sizes): the header
    (data.pkl) still reads, any read of tensor data fails its CRC-32."""
    with zipfile.ZipFile(path) as zf:
        spans = []
        for info in zf.infolist():
            if "/data/" in info.filename and info.file_size:
                spans.append((info.header_offset, info.file_size))
    with open(path, "r+b") as f:
        for offset, size in spans:
            f.seek(offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            f.seek(offset + 30 + name_len + extra_len)
            f.write(bytes((i * 7 + 3) % 256 for i in range(size)))
    return path


def source_digest(path: Path) -> dict[str, str]:
    """What the provenance records for a source file: ``{algorithm: hex digest}``, computed
    here independently of ckptsurgery (xxh3-128 with xxhash installed, else sha256)."""
    from ckptsurgery.io.checksums import DIGEST

    data = Path(path).read_bytes()
    if DIGEST == "xxh3_128":
        import xxhash

        return {DIGEST: xxhash.xxh3_128_hexdigest(data)}
    return {DIGEST: hashlib.sha256(data).hexdigest()}


# -- merge methods: a reference from the definitions (tests/plan/test_methods.py, tests/cli) -----

CONSENSUS = ("ties", "dare-ties")
DARE = ("dare-linear", "dare-ties")


def method_reference(
    method: str,
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    key: str,
    weights: Sequence[float] | None = None,
    density: float = 1.0,
    lambda_: float = 1.0,
    seed: int = 0,
    normalize: bool | None = None,
) -> torch.Tensor:
    """One tensor merged straight from the definitions (mergekit's generalized task
    arithmetic), stacking every task vector; DARE's masks come from the documented generator:
    seeded by sha256(f"{seed}:{key}"), one ``rand < density`` draw per model in order."""
    weights = list(weights) if weights else [1.0] * len(models)
    if normalize is None:
        normalize = method == "ties"
    wide = any(t.dtype == torch.float64 for t in (base, *models))
    acc = torch.float64 if wide else torch.float32
    b = base.to(acc)
    g = torch.Generator()
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    g.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    vectors = []
    for x, w in zip(models, weights, strict=True):
        d = x.to(acc) - b
        n = d.numel()
        if method == "ties" and density < 1 and n:
            k = max(1, int(density * n))
            order = torch.sort(d.abs().reshape(-1), descending=True, stable=True).indices
            mask = torch.zeros(n, dtype=torch.bool)
            mask[order[:k]] = True
            d = d * mask.reshape(d.shape)
        elif method in DARE and density < 1:
            keep = torch.rand(d.shape, generator=g, dtype=torch.float32) < density
            d = d * keep / density
        vectors.append(d * w)
    v = torch.stack(vectors)
    w = torch.tensor(weights, dtype=acc).reshape(-1, *([1] * b.dim()))
    if method in CONSENSUS:
        elected = torch.where(v.sum(0) >= 0, 1.0, -1.0).to(acc)
        agree = v.sign() == elected
        mixed = (v * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = v.sum(0)
        total = sum(weights)
        divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total, dtype=acc)
    if normalize:
        mixed = mixed / divisor
    return (b + lambda_ * mixed).to(base.dtype)


def method_reference_dict(
    method: str,
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    **params: Any,
) -> dict[str, torch.Tensor]:
    return {
        k: method_reference(method, v, [m[k] for m in models], key=k, **params)
        if v.is_floating_point()
        else v
        for k, v in base.items()
    }


# -- LoRA adapters made by peft ---------------------------------------------------------------


def peft_lora(
    model: nn.Module,
    folder: Path,
    *,
    seed: int = 0,
    safe_serialization: bool = True,
    **config: Any,
) -> dict[str, torch.Tensor]:
    """Attach a peft LoRA (``config``: LoraConfig's fields) to ``model`` with every LoRA
    factor and ``modules_to_save`` copy drawn at random (so the fold is not a no-op), save
    the adapter to ``folder`` and return peft's own ``merge_and_unload()`` state dict.
    The caller saves the base before calling this (peft wraps ``model`` in place)."""
    from peft import LoraConfig, get_peft_model

    peft_type = config.pop("peft_config", None)
    with warnings.catch_warnings():  # transformers' deprecations, called by peft
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = get_peft_model(model, peft_type or LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.3)
    wrapped.save_pretrained(folder, safe_serialization=safe_serialization)
    merged = wrapped.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def tiny_bert(num_labels: int = 3, seed: int = 0) -> nn.Module:
    """A 2-layer BERT classifier from a config (hidden 16): no download."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=24,
        num_labels=num_labels,
    )
    model: nn.Module = BertForSequenceClassification(config).eval()
    return model


def assert_close_state(
    got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], *, atol: float = 1e-5
) -> None:
    """The same keys, dtypes and shapes, every value within ``atol``."""
    assert sorted(got) == sorted(want), set(got) ^ set(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, w.dtype, g.shape, w.shape)
        diff = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
        assert diff <= atol, (k, diff)
