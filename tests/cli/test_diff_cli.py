"""``ckptsurgery diff`` through CliRunner, against real torchvision models and a tied-weights
model defined here: exact key sets, the JSON of the contract, exit codes and golden tables.

The torchvision models are built on the meta device; checkpoints of their shapes are saved
with zero-stride tensors (one element each, expanded), so that a ViT-B checkpoint costs a few
kilobytes: ``diff`` reads names, shapes and dtypes only.

Regenerate the golden tables with ``UPDATE_GOLDEN=1 pytest tests/cli/test_diff_cli.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_error, check_golden, cli_run, import_source, no_traceback
from safetensors.torch import save_file

torchvision = pytest.importorskip("torchvision")

CONTRACT_KEYS = {
    "compatible",
    "matched",
    "missing",
    "unexpected",
    "shape_mismatch",
    "dtype_mismatch",
}

# -- helpers ----------------------------------------------------------------------------------


def diff_json(*args: str | Path, code: int) -> dict[str, Any]:
    """``diff ... --json``: the exit code, one JSON object on stdout, no error on stderr."""
    result = cli_run("diff", *args, "--json")
    no_traceback(result)
    assert result.exit_code == code, result.output
    assert "Error:" not in result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    assert set(data) >= CONTRACT_KEYS
    for entry in data["shape_mismatch"] + data["dtype_mismatch"]:
        assert set(entry) == {"key", "checkpoint", "model"}
    assert data["compatible"] is (code == 0)
    return data


def meta_state(name: str, **kwargs: Any) -> dict[str, torch.Tensor]:
    """The state dict of ``torchvision.models.NAME(**kwargs)``, built on meta (no weights)."""
    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None, **kwargs)
    return model.state_dict()


def fake(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of the same names, shapes and dtypes that each store one element."""
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in state.items()}


def shapes(state: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


@pytest.fixture(scope="module")
def r18() -> dict[str, torch.Tensor]:
    return meta_state("resnet18")


@pytest.fixture(scope="module")
def r50() -> dict[str, torch.Tensor]:
    return meta_state("resnet50")


@pytest.fixture(scope="module")
def vit() -> dict[str, torch.Tensor]:
    return meta_state("vit_b_16")


def save(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


# -- torchvision models: exact key sets -------------------------------------------------------


def test_dataparallel_prefix_matches_nothing(tmp_path: Path, r18: dict[str, torch.Tensor]) -> None:
    src = save({"module." + k: v for k, v in fake(r18).items()}, tmp_path / "dp.pth")
    data = diff_json(src, "--model", "torchvision:resnet18", code=1)
    assert data["matched"] == []
    assert data["missing"] == list(r18)
    assert data["unexpected"] == ["module." + k for k in r18]
    assert data["shape_mismatch"] == [] and data["dtype_mismatch"] == []
    assert data["summary"]["model_tensors"] == data["summary"]["checkpoint_tensors"] == 122


def moco(state: Mapping[str, torch.Tensor], dim: int) -> dict[str, Any]:
    """A MoCo v2 training checkpoint: query and key encoders with an MLP head, and the queue."""
    sd: dict[str, torch.Tensor] = {}
    for enc in ("module.encoder_q.", "module.encoder_k."):
        sd.update({enc + k: v for k, v in fake(state).items() if not k.startswith("fc.")})
        sd[enc + "fc.0.weight"] = torch.zeros(()).expand(dim, dim)
        sd[enc + "fc.0.bias"] = torch.zeros(()).expand(dim)
        sd[enc + "fc.2.weight"] = torch.zeros(()).expand(128, dim)
        sd[enc + "fc.2.bias"] = torch.zeros(()).expand(128)
    sd["module.queue"] = torch.zeros(()).expand(128, 65536)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 200, "arch": "resnet50", "state_dict": sd, "optimizer": {"lr": 0.03}}


def test_moco_nested_checkpoint(tmp_path: Path, r50: dict[str, torch.Tensor]) -> None:
    ckpt = moco(r50, 2048)
    src = save(ckpt, tmp_path / "moco_v2.pth.tar")
    result = cli_run("diff", src, "--model", "torchvision:resnet50", "--json")
    assert result.exit_code == 1
    assert "using the state dict at 'state_dict'" in result.stderr
    assert "epoch" in result.stderr and "optimizer" in result.stderr
    data = json.loads(result.stdout)
    assert data["matched"] == [] and data["shape_mismatch"] == []
    assert data["missing"] == list(r50)
    assert data["unexpected"] == list(ckpt["state_dict"])
    assert len(data["unexpected"]) == 2 * (len(r50) - 2 + 4) + 2

    # --key picks the same state dict, silently.
    result = cli_run(
        "diff", src, "--model", "torchvision:resnet50", "--key", "state_dict", "--json"
    )
    assert result.exit_code == 1 and result.stderr == ""
    assert json.loads(result.stdout) == data


def test_head_changed_is_a_shape_mismatch_no_glob_allows(
    tmp_path: Path, r18: dict[str, torch.Tensor]
) -> None:
    src = save(fake(meta_state("resnet18", num_classes=10)), tmp_path / "r18_10.pth")
    data = diff_json(src, "--model", "torchvision:resnet18", code=1)
    assert data["shape_mismatch"] == [
        {"key": "fc.weight", "checkpoint": [10, 512], "model": [1000, 512]},
        {"key": "fc.bias", "checkpoint": [10], "model": [1000]},
    ]
    assert data["matched"] == [k for k in r18 if not k.startswith("fc.")]
    assert data["missing"] == [] and data["unexpected"] == []
    # A tensor of the wrong shape cannot load, whatever is allowed.
    allowed = diff_json(src, "--model", "torchvision:resnet18", "--allow-missing", "fc.*", code=1)
    assert allowed["shape_mismatch"] == data["shape_mismatch"]
    # ... but it fits the model built for 10 classes.
    fits = diff_json(
        src, "--model", "torchvision:resnet18", "--model-arg", "num_classes=10", code=0
    )
    assert fits["matched"] == list(r18)
    assert fits["missing"] == fits["unexpected"] == fits["shape_mismatch"] == []


def test_vit_head_changed(tmp_path: Path, vit: dict[str, torch.Tensor]) -> None:
    src = save(fake(vit), tmp_path / "vit_b_16.pth")
    args = ("--model", "torchvision:vit_b_16", "--model-arg", "num_classes=10")
    data = diff_json(src, *args, code=1)
    assert data["shape_mismatch"] == [
        {"key": "heads.head.weight", "checkpoint": [1000, 768], "model": [10, 768]},
        {"key": "heads.head.bias", "checkpoint": [1000], "model": [10]},
    ]
    assert data["matched"] == [k for k in vit if not k.startswith("heads.")]
    assert data["missing"] == [] and data["unexpected"] == []
    # Without its head the checkpoint fits once the head may be missing.
    backbone = save(
        {k: v for k, v in fake(vit).items() if not k.startswith("heads.")}, tmp_path / "bb.pth"
    )
    data = diff_json(backbone, *args, "--allow-missing", "heads.*", code=0)
    assert data["missing"] == data["allowed_missing"] == ["heads.head.weight", "heads.head.bias"]


def test_partial_checkpoint_backbone_only(tmp_path: Path, r50: dict[str, torch.Tensor]) -> None:
    backbone = {k: v for k, v in fake(r50).items() if not k.startswith(("layer4.", "fc."))}
    src = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.items()}, str(src))
    want_missing = [k for k in r50 if k.startswith(("layer4.", "fc."))]

    data = diff_json(src, "--model", "torchvision:resnet50", code=1)
    assert data["missing"] == want_missing
    assert data["matched"] == list(backbone)
    assert data["unexpected"] == [] and data["shape_mismatch"] == []

    # Allowing only the head is not enough; allowing both is.
    diff_json(src, "--model", "torchvision:resnet50", "--allow-missing", "fc.*", code=1)
    data = diff_json(
        src,
        "--model",
        "torchvision:resnet50",
        "--allow-missing",
        "fc.*",
        "--allow-missing",
        "layer4.*",
        code=0,
    )
    assert data["allowed_missing"] == want_missing


def test_allow_glob_that_matches_nothing_is_noted(
    tmp_path: Path, r18: dict[str, torch.Tensor]
) -> None:
    src = save({k: v for k, v in fake(r18).items() if not k.startswith("fc.")}, tmp_path / "a.pt")
    result = cli_run("diff", src, "--model", "torchvision:resnet18", "--allow-missing", "head.*")
    assert result.exit_code == 1
    assert "note: allow glob head.* matched no key" in result.stderr
    result = cli_run("diff", src, "--model", "torchvision:resnet18", "--allow-missing", "fc.*")
    assert result.exit_code == 0 and result.stderr == ""


def test_dtype_difference_is_informational(tmp_path: Path, r18: dict[str, torch.Tensor]) -> None:
    half = {k: v.half() if v.is_floating_point() else v for k, v in fake(r18).items()}
    data = diff_json(save(half, tmp_path / "half.pt"), "--model", "torchvision:resnet18", code=0)
    floating = [k for k, v in r18.items() if v.is_floating_point()]
    assert [m["key"] for m in data["dtype_mismatch"]] == floating
    assert data["dtype_mismatch"][0] == {
        "key": "conv1.weight",
        "checkpoint": "float16",
        "model": "float32",
    }


def test_against_another_checkpoint(tmp_path: Path, r18: dict[str, torch.Tensor]) -> None:
    ref = save(fake(r18), tmp_path / "ref.pth")
    head10 = fake(meta_state("resnet18", num_classes=10))
    src = save({**head10, "extra.buffer": torch.zeros(3)}, tmp_path / "src.pth")
    data = diff_json(src, "--against", ref, code=1)
    assert data["unexpected"] == ["extra.buffer"]
    assert [m["key"] for m in data["shape_mismatch"]] == ["fc.weight", "fc.bias"]
    assert data["missing"] == []
    assert len(data["matched"]) == len(r18) - 2

    # The same file is compatible with itself; --ref-key selects REF's nested state dict.
    nested = save({"state_dict": fake(r18), "state_dict_ema": fake(r18)}, tmp_path / "n.pth")
    data = diff_json(ref, "--against", nested, "--ref-key", "state_dict_ema", code=0)
    assert data["matched"] == list(r18)


def test_model_arg_reaches_the_factory(tmp_path: Path) -> None:
    src = save(fake(meta_state("resnet18", num_classes=10)), tmp_path / "r.pth")
    diff_json(src, "--model", "torchvision:resnet18", "--model-arg", "num_classes=10", code=0)
    data = diff_json(src, "--model", "torchvision:resnet18", "--model-arg", "num_classes=7", code=1)
    assert data["shape_mismatch"][0]["model"] == [7, 512]


# -- a tied-weights model from an importable module -------------------------------------------

NETS = '''
import torch
from torch import nn


class TinyLM(nn.Module):
    """A language model whose output layer shares the embedding's weight (tied)."""

    def __init__(self, vocab: int = 50, dim: int = 8, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        # Not part of the state dict: never expected from a checkpoint.
        self.register_buffer("positions", torch.arange(16), persistent=False)
        if tie:
            self.lm_head.weight = self.embed.weight
'''


@pytest.fixture
def nets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The module ``cs_diff_nets`` in the current folder, where model specs look first."""
    monkeypatch.chdir(tmp_path)
    yield from import_source(tmp_path, "cs_diff_nets", NETS, monkeypatch)


TINY_LM = ("--model", "cs_diff_nets:TinyLM")
LM_KEYS = [
    "embed.weight",
    "blocks.0.weight",
    "blocks.0.bias",
    "blocks.1.weight",
    "blocks.1.bias",
    "norm.weight",
    "norm.bias",
    "lm_head.weight",
]


def test_tied_model_full_checkpoint(nets: Any) -> None:
    torch.save(nets.TinyLM().state_dict(), "lm.pt")
    data = diff_json("lm.pt", *TINY_LM, code=0)
    assert data["matched"] == LM_KEYS
    assert data["missing"] == data["unexpected"] == data["tied_aliases"] == []


def test_tied_alias_is_not_missing(nets: Any) -> None:
    # safetensors stores a tied tensor once, under one of its names.
    state = {k: v for k, v in nets.TinyLM().state_dict().items() if k != "lm_head.weight"}
    save_file(state, "lm.safetensors")
    data = diff_json("lm.safetensors", *TINY_LM, code=0)
    assert data["matched"] == [k for k in LM_KEYS if k != "lm_head.weight"]
    assert data["missing"] == [] and data["unexpected"] == []
    assert data["tied_aliases"] == ["lm_head.weight"]
    result = cli_run("diff", "lm.safetensors", *TINY_LM)
    assert "lm_head.weight (tied to embed.weight)" in result.stdout

    # Untied, the output layer has no partner and is missing.
    data = diff_json("lm.safetensors", *TINY_LM, "--model-arg", "tie=False", code=1)
    assert data["missing"] == ["lm_head.weight"] and data["tied_aliases"] == []


def test_tied_model_prefixed_and_partial(nets: Any) -> None:
    state = nets.TinyLM().state_dict()
    torch.save({"module." + k: v for k, v in state.items()}, "dp.pt")
    data = diff_json("dp.pt", *TINY_LM, code=1)
    assert data["missing"] == LM_KEYS
    assert data["unexpected"] == ["module." + k for k in LM_KEYS]

    torch.save({k: v for k, v in state.items() if not k.startswith("blocks.1")}, "part.pt")
    data = diff_json("part.pt", *TINY_LM, code=1)
    assert data["missing"] == ["blocks.1.weight", "blocks.1.bias"]
    assert data["matched"] == [k for k in LM_KEYS if not k.startswith("blocks.1")]
    diff_json("part.pt", *TINY_LM, "--allow-missing", "blocks.1.*", code=0)


# -- errors -----------------------------------------------------------------------------------


def test_unknown_torchvision_model_suggests_close_names(tmp_path: Path) -> None:
    src = save({"w": torch.zeros(1)}, tmp_path / "a.pt")
    line = assert_error(cli_run("diff", src, "--model", "torchvision:resnet19"), "resnet19")
    assert "resnet18" in line


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "exactly one of --model SPEC and --against REF"),
        (["--model", "torchvision:resnet18", "--against", "REF"], "exactly one of"),
        (["--against", "REF", "--model-arg", "num_classes=10"], "--model-arg needs --model"),
        (["--model", "torchvision:resnet18", "--model-arg", "num_classes"], "num_classes"),
        (["--model", "resnet18"], "torchvision:resnet18"),
    ],
)
def test_usage_errors(tmp_path: Path, args: list[str], fragment: str) -> None:
    src = save({"w": torch.zeros(1)}, tmp_path / "a.pt")
    assert_error(cli_run("diff", src, *args), fragment)


@pytest.mark.parametrize("flag", ["--model", "--against"])
def test_missing_source(tmp_path: Path, flag: str) -> None:
    ref = save({"w": torch.zeros(1)}, tmp_path / "ref.pt")
    target = "torchvision:resnet18" if flag == "--model" else str(ref)
    assert_error(cli_run("diff", tmp_path / "nope.pth", flag, target), "nope.pth")
    # ... and a missing REF.
    assert_error(cli_run("diff", ref, "--against", tmp_path / "gone.pth"), "gone.pth")


# -- golden tables ----------------------------------------------------------------------------


def test_golden_prefixed_resnet18(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, r18: dict[str, torch.Tensor]
) -> None:
    monkeypatch.chdir(tmp_path)
    save({"module." + k: v for k, v in fake(r18).items()}, Path("resnet18_dp.pth"))
    result = cli_run("diff", "resnet18_dp.pth", "--model", "torchvision:resnet18")
    assert result.exit_code == 1
    check_golden("diff_resnet18_prefixed.txt", result.stdout)
    assert "--suggest" in result.stderr  # the hint

    result = cli_run("diff", "resnet18_dp.pth", "--model", "torchvision:resnet18", "--suggest")
    assert result.exit_code == 1
    check_golden("diff_resnet18_prefixed_suggest.txt", result.stdout)


def test_golden_vit_head_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vit: dict[str, torch.Tensor]
) -> None:
    monkeypatch.chdir(tmp_path)
    save(fake(vit), Path("vit_b_16.pth"))
    args = ("--model", "torchvision:vit_b_16", "--model-arg", "num_classes=10")
    result = cli_run("diff", "vit_b_16.pth", *args)
    assert result.exit_code == 1
    assert result.stderr.startswith("hint: --suggest")
    check_golden("diff_vit_b_16_head10.txt", result.stdout)
