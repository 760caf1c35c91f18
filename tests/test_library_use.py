"""The library as a new user meets it: starting a text classifier from a pretrained encoder.

A real (tiny) torch model with an encoder under ``bert.`` and a ``classifier`` head, and an
encoder checkpoint saved without the prefix, as a base model's checkpoint is. Also: the README's
library example, extracted from README.md and run against files made here.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import cli_run, raw
from safetensors.torch import save_file
from torch import nn

import ckptsurgery as cs
from ckptsurgery.io.safetensors_format import SafetensorsCheckpoint

README = Path(__file__).resolve().parents[1] / "README.md"


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(50, 16)
        self.layer = nn.ModuleList(nn.Linear(16, 16) for _ in range(6))
        self.norm = nn.LayerNorm(16)


class TextClassifier(nn.Module):
    """What a training script builds: the encoder under ``bert.``, a fresh head."""

    def __init__(self, num_labels: int = 3) -> None:
        super().__init__()
        self.bert = Encoder()
        self.classifier = nn.Linear(16, num_labels)


@pytest.fixture
def encoder_file(tmp_path: Path) -> Path:
    """A pretrained encoder's checkpoint, in the base model's naming (no ``bert.``)."""
    torch.manual_seed(0)
    path = tmp_path / "encoder.safetensors"
    save_file(Encoder().state_dict(), path)
    return path


def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading any tensor data from a safetensors file fails the test from here on."""

    def refuse(self: object, name: str, *args: object) -> None:
        raise AssertionError(f"tensor data of {name!r} was read")

    for method in ("tensor", "raw_bytes", "write_data", "data_crc"):
        monkeypatch.setattr(SafetensorsCheckpoint, method, refuse)


# --- printing a report ----------------------------------------------------------------------


def test_print_report_is_the_table_and_repr_is_short(encoder_file: Path) -> None:
    report = cs.match(encoder_file, TextClassifier(), rules=cs.Rules(add_prefix="bert."))
    text = str(report)
    assert text == report.table(notes=True)
    assert "missing: in the model, not in the checkpoint (2):" in text
    assert "classifier.{bias, weight}" in text
    assert text.endswith(report.summary())
    assert repr(report) == f"<MatchReport: {report.summary()}>"
    assert len(repr(report)) < 200
    html = report._repr_html_()
    assert html.startswith("<pre") and "classifier.{bias, weight}" in html
    assert "INCOMPATIBLE" in html


def test_repr_html_escapes_key_names() -> None:
    report = cs.match({"a<b>": torch.zeros(1)}, {"a<b>": torch.zeros(2)})
    assert "a&lt;b&gt;" in report._repr_html_()
    assert "a<b>" not in report._repr_html_()


# --- a path, an open Checkpoint or a state dict alike ---------------------------------------


def test_match_takes_a_path_a_checkpoint_or_a_state_dict(
    encoder_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    model = TextClassifier()
    rules = cs.Rules(add_prefix="bert.")
    from_dict = cs.match(load_file(encoder_file), model, rules=rules)
    no_tensor_reads(monkeypatch)  # a path and a Checkpoint are matched from the header alone
    from_path = cs.match(encoder_file, model, rules=rules)
    from_str = cs.match(str(encoder_file), model, rules=rules)
    with cs.open_checkpoint(encoder_file) as ckpt:
        from_ckpt = cs.match(ckpt, model, rules=rules)
        renamed = cs.match(rules.apply(ckpt), model)
    with rules.apply(encoder_file) as view:
        from_view = cs.match(view, model)
    reports = [from_path, from_str, from_ckpt, renamed, from_view]
    assert all(r.to_json() == from_dict.to_json() for r in reports)
    assert from_dict.missing == ["classifier.weight", "classifier.bias"]
    assert from_dict.unexpected == [] and len(from_dict.matched) == 15


def test_rules_apply_on_a_checkpoint_is_a_renamed_header_view(encoder_file: Path) -> None:
    rules = cs.Rules(add_prefix="bert.", drop=["norm.*"])
    with cs.open_checkpoint(encoder_file) as ckpt:
        view = rules.apply(ckpt)
        assert isinstance(view, cs.Checkpoint)
        assert list(view.infos) == [f"bert.{k}" for k in ckpt.infos if not k.startswith("norm.")]
        assert raw(view.tensor("bert.layer.0.weight")) == raw(ckpt.tensor("layer.0.weight"))
    as_dict = rules.apply({"layer.0.weight": torch.ones(1), "norm.bias": torch.ones(1)})
    assert list(as_dict) == ["bert.layer.0.weight"]
    with pytest.raises(TypeError, match="state dict, an open Checkpoint or a path"):
        rules.apply(42)  # type: ignore[call-overload]


def test_load_into_from_a_path_reads_only_after_the_match(encoder_file: Path) -> None:
    model = TextClassifier()
    head = raw(model.classifier.weight)
    report = cs.load_into(
        model, encoder_file, rules=cs.Rules(add_prefix="bert."), allow_missing="classifier.*"
    )
    assert report.compatible and len(report.matched) == 15
    with cs.open_checkpoint(encoder_file) as ckpt:
        for key in ckpt.infos:
            assert raw(model.state_dict()[f"bert.{key}"]) == raw(ckpt.tensor(key))
    assert raw(model.classifier.weight) == head  # the head keeps its initialisation


# --- what matched nothing is said ------------------------------------------------------------


def test_unused_rules_and_allow_globs_warn_and_are_report_lines(encoder_file: Path) -> None:
    rules = cs.Rules(add_prefix="bert.", strip_prefix=["module."])
    with pytest.warns(cs.UnusedPatternWarning, match=r"--strip-prefix module\. matched no key"):
        rules.apply({"layer.0.weight": torch.zeros(1)})
    with pytest.warns(cs.UnusedPatternWarning) as caught:
        report = cs.match(
            encoder_file,
            TextClassifier(),
            rules=rules,
            allow_missing=["classifer.*", "classifier.*"],
        )
    messages = sorted(str(w.message) for w in caught)
    assert messages == [
        "allow_missing glob 'classifer.*' matched no key",
        "rule --strip-prefix module. matched no key",
    ]
    assert report.unused_rules == ("--strip-prefix module.",)
    assert report.notes() == [
        "rule --strip-prefix module. matched no key",
        "allow_missing glob 'classifer.*' matched no key",
    ]
    assert "notes (2):\n  rule --strip-prefix module. matched no key" in str(report)
    assert report.compatible  # the used glob still allows the head


def test_everything_used_means_no_warning(encoder_file: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = cs.match(
            encoder_file,
            TextClassifier(),
            rules=cs.Rules(add_prefix="bert."),
            allow_missing=["classifier.*"],
        )
    assert report.notes() == [] and "notes" not in str(report)


def test_the_cli_prints_notes_not_python_warnings(tmp_path: Path, encoder_file: Path) -> None:
    result = cli_run(
        "remap", encoder_file, "-o", tmp_path / "o.safetensors", "--dry-run", "--drop", "nothing.*"
    )
    assert result.exit_code == 0, result.output
    assert "note: --drop 'nothing.*' matched no key" in result.stderr
    assert "UnusedPatternWarning" not in result.stderr


# --- a failed load names its fix -------------------------------------------------------------


def test_failed_load_into_names_the_rules_that_fix_it(encoder_file: Path) -> None:
    model = TextClassifier()
    before = {k: raw(v) for k, v in model.state_dict().items()}
    with pytest.raises(cs.IncompatibleCheckpoint) as caught:
        cs.load_into(model, encoder_file, allow_missing=["classifier.*"])
    message = str(caught.value)
    assert "Nothing was loaded" in message
    assert "Try rules=Rules(add_prefix='bert.'): 15 of 17 model keys would match" in message
    assert "allow_missing=['classifier.*']" in message
    assert caught.value.suggestion.rules == cs.Rules(add_prefix="bert.")
    assert {k: raw(v) for k, v in model.state_dict().items()} == before

    # The message's fix, taken at its word, loads.
    report = cs.load_into(
        model, encoder_file, rules=caught.value.suggestion.rules, allow_missing=["classifier.*"]
    )
    assert report.compatible


def test_a_head_of_another_size_suggests_no_rules(tmp_path: Path) -> None:
    path = tmp_path / "full.safetensors"
    save_file(TextClassifier(num_labels=5).state_dict(), path)
    with pytest.raises(cs.IncompatibleCheckpoint) as caught:
        cs.load_into(TextClassifier(num_labels=3), path)
    assert caught.value.suggestion is None
    assert "Try rules=" not in str(caught.value)
    assert "drop_mismatched=True" in str(caught.value)


def test_rules_repr_is_the_call_that_builds_them() -> None:
    assert repr(cs.Rules()) == "Rules()"
    rules = cs.Rules(strip_prefix="module.", replace=[("a", "b")], add_prefix="bert.")
    assert (
        repr(rules) == "Rules(strip_prefix=['module.'], replace=[['a', 'b']], add_prefix='bert.')"
    )
    assert eval(repr(rules), {"Rules": cs.Rules}) == rules


# --- the README's example --------------------------------------------------------------------


def readme_example() -> str:
    """The Python block that follows the ``<!-- library-example -->`` marker in README.md."""
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- library-example -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert found, "README.md has no <!-- library-example --> python block"
    return found.group(1)


def test_readme_library_example_runs(
    tmp_path: Path,
    encoder_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 8
    monkeypatch.chdir(tmp_path)  # the example names encoder.safetensors
    namespace: dict[str, object] = {"TextClassifier": TextClassifier}
    exec(compile(code, str(README), "exec"), namespace)
    model = namespace["model"]
    assert isinstance(model, TextClassifier)
    with cs.open_checkpoint(encoder_file) as ckpt:
        for key in ckpt.infos:
            assert raw(model.state_dict()[f"bert.{key}"]) == raw(ckpt.tensor(key))
    printed = capsys.readouterr().out
    assert "-> compatible" in printed


def test_readme_library_section_names_the_whole_api() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## The library\n")
    section = text[start : text.index("\n## ", start + 1)]
    for name in (
        "keep=",
        "drop=",
        "strip_prefix=",
        "replace=",
        "regex=",
        "add_prefix=",
        "cs.match(",
        "cs.load_into(",
        "cs.suggest(",
        "cs.open_checkpoint(",
        "UnusedPatternWarning",
        "IncompatibleCheckpoint",
    ):
        assert name in section, name
