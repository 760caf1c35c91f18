"""``--model timm:NAME`` and ``--model hf:PATH[:CLASS]`` with the real libraries.

timm builds with ``pretrained=False``; transformers builds from a ``config.json`` that
``transformers`` itself wrote into ``tmp_path`` (a tiny BERT), on the meta device. Nothing is
downloaded. Both libraries are installed by the ``timm`` and ``hf`` extras (``make test``
installs them), so these tests run in CI; they skip only where the import fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_error, cli_run, no_traceback
from safetensors.torch import load_file, save_file

from ckptsurgery.models import ModelSpecError, build_model

timm = pytest.importorskip("timm", reason="timm is not installed (the [timm] extra)")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (the [hf] extra)"
)

TINY_BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 100,
}
CLASSIFIER = ["classifier.weight", "classifier.bias"]


def diff_json(*args: str | Path, code: int) -> dict[str, Any]:
    result = cli_run("diff", *args, "--json")
    no_traceback(result)
    assert result.exit_code == code, result.output
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


# --- timm ------------------------------------------------------------------------------------


def test_timm_builds_on_meta_without_pretrained_weights() -> None:
    built = build_model("timm:resnet18", {"num_classes": 10})
    assert built.on_meta and built.note is None
    assert type(built.module).__module__.startswith("timm.")
    assert tuple(built.module.state_dict()["fc.weight"].shape) == (10, 512)


def test_timm_refuses_an_unknown_name_with_close_matches() -> None:
    with pytest.raises(ModelSpecError, match=r"timm has no model 'resnet181'.*resnet18"):
        build_model("timm:resnet181")


def test_diff_timm_resnet18_with_num_classes_mismatches_only_the_head(tmp_path: Path) -> None:
    ckpt = tmp_path / "resnet18.safetensors"
    save_file(contiguous(timm.create_model("resnet18", pretrained=False).state_dict()), ckpt)

    report = diff_json(ckpt, "--model", "timm:resnet18", "--model-arg", "num_classes=10", code=1)
    assert report["missing"] == [] and report["unexpected"] == []
    assert {m["key"]: (m["checkpoint"], m["model"]) for m in report["shape_mismatch"]} == {
        "fc.weight": ([1000, 512], [10, 512]),
        "fc.bias": ([1000], [10]),
    }
    # The head dropped for its shape, then allowed missing: the rest fits.
    result = cli_run(
        "remap",
        ckpt,
        "-o",
        tmp_path / "out.safetensors",
        "--model",
        "timm:resnet18",
        "--model-arg",
        "num_classes=10",
        "--drop-mismatched",
        "--allow-missing",
        "fc.*",
    )
    no_traceback(result)
    assert result.exit_code == 0, result.output
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    missing, unexpected = net.load_state_dict(load_file(tmp_path / "out.safetensors"), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


def test_timm_missing_extra_is_one_error_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    assert_error(cli_run("diff", "x.pt", "--model", "timm:resnet18"), "ckptsurgery[timm]")


# --- Hugging Face ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT's config.json, written by transformers itself."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    transformers.BertConfig(**TINY_BERT).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base_state(bert_dir: Path) -> dict[str, torch.Tensor]:
    """A pretrained encoder's weights: BertModel's state dict, keys without ``bert.``."""
    config = transformers.AutoConfig.from_pretrained(bert_dir, local_files_only=True)
    torch.manual_seed(0)
    return contiguous(transformers.BertModel(config).state_dict())


def test_hf_builds_a_classifier_on_meta_with_config_overrides(bert_dir: Path) -> None:
    built = build_model(f"hf:{bert_dir}:BertForSequenceClassification", {"num_labels": 3})
    assert built.on_meta and built.note is None
    sd = built.module.state_dict()
    assert tuple(sd["classifier.weight"].shape) == (3, 32)
    assert all(t.is_meta for t in sd.values())  # no weight was allocated, none loaded
    auto = build_model(f"hf:{bert_dir}:AutoModelForSequenceClassification", {"num_labels": 5})
    assert type(auto.module).__name__ == "BertForSequenceClassification"
    assert tuple(auto.module.state_dict()["classifier.weight"].shape) == (5, 32)
    base = build_model(f"hf:{bert_dir}")  # AutoModel by default
    assert type(base.module).__name__ == "BertModel"
    # the config.json file itself names the same folder
    assert type(build_model(f"hf:{bert_dir / 'config.json'}").module).__name__ == "BertModel"


def test_hf_reads_a_hugging_face_cache_folder(tmp_path: Path, bert_dir: Path) -> None:
    repo = tmp_path / "hub" / "models--org--tiny-bert"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "config.json").write_bytes((bert_dir / "config.json").read_bytes())
    (repo / "snapshots" / "ffff0000").mkdir()  # an older snapshot without a config
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for spec in (f"hf:{repo}:BertModel", f"hf:{snap}:BertModel"):
        assert type(build_model(spec).module).__name__ == "BertModel"


def test_diff_base_checkpoint_against_classifier_misses_only_the_classifier(
    tmp_path: Path, bert_dir: Path, base_state: dict[str, torch.Tensor]
) -> None:
    model = ["--model", f"hf:{bert_dir}:BertForSequenceClassification"]
    model += ["--model-arg", "num_labels=3"]

    # The encoder saved under the classifier's naming (``bert.*``): only the head is missing.
    prefixed = tmp_path / "encoder_bert.safetensors"
    save_file({f"bert.{k}": v for k, v in base_state.items()}, prefixed)
    report = diff_json(prefixed, *model, code=1)
    assert sorted(report["missing"]) == sorted(CLASSIFIER)
    assert report["unexpected"] == [] and report["shape_mismatch"] == []
    report = diff_json(prefixed, *model, "--allow-missing", "classifier.*", code=0)
    assert report["compatible"] is True

    # The base model's own naming: nothing lines up until `bert.` is added, as suggested.
    plain = tmp_path / "encoder.safetensors"
    save_file(base_state, plain)
    report = diff_json(plain, *model, "--suggest", code=1)
    assert len(report["unexpected"]) == len(base_state)
    assert report["suggestion"]["rules"] == {"add_prefix": "bert."}
    assert report["suggestion"]["matched_after"] == len(base_state)


@pytest.mark.parametrize(
    ("spec_tail", "fragment"),
    [
        (":BertForSequenceClassifier", "no model class 'BertForSequenceClassifier'"),
        ("/nowhere", "does not exist"),
    ],
)
def test_hf_bad_specs_are_one_error_line(
    tmp_path: Path, bert_dir: Path, spec_tail: str, fragment: str
) -> None:
    ckpt = tmp_path / "c.safetensors"
    save_file({"x": torch.zeros(1)}, ckpt)
    result = cli_run("diff", ckpt, "--model", f"hf:{bert_dir}{spec_tail}")
    assert_error(result, fragment)


def test_hf_folder_without_config_and_unknown_field(tmp_path: Path, bert_dir: Path) -> None:
    ckpt = tmp_path / "c.safetensors"
    save_file({"x": torch.zeros(1)}, ckpt)
    assert_error(cli_run("diff", ckpt, "--model", f"hf:{tmp_path}"), "has no config.json")
    assert_error(
        cli_run("diff", ckpt, "--model", f"hf:{bert_dir}", "--model-arg", "num_lables=3"),
        "no field 'num_lables'",
        "num_labels",
    )


def test_hf_missing_extra_is_one_error_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bert_dir: Path
) -> None:
    ckpt = tmp_path / "c.safetensors"
    save_file({"x": torch.zeros(1)}, ckpt)
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert_error(cli_run("diff", ckpt, "--model", f"hf:{bert_dir}"), "ckptsurgery[hf]")


def test_help_imports_neither_timm_nor_transformers() -> None:
    code = textwrap.dedent(
        """
        import sys
        from ckptsurgery.cli import cli
        for args in (["diff", "--help"], ["remap", "--help"]):
            try:
                cli.main(args, prog_name="ckptsurgery")
            except SystemExit as e:
                assert e.code == 0, e.code
        heavy = [m for m in ("torch", "timm", "transformers") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "hf:PATH[:CLASS]" in proc.stdout
