"""The training loop through the library: frozen backbones stay bit-identical, BatchNorm policy,
outputs that reload strictly, and --resume equivalence."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import raw
from safetensors.torch import load_file, save_file
from test_train_support import (
    TINY_VIT,
    TINY_VIT_ARGS,
    make_images,
    training_folder,
    write_tiny_nets,
)
from torch import nn

from ckptsurgery.models import build_model
from ckptsurgery.train import TrainConfig, TransformConfig, train
from ckptsurgery.train.bn import (
    frozen_batchnorms,
    frozen_digests,
    recalibrate_bn,
    train_mode,
    verify_frozen,
)
from ckptsurgery.train.errors import FrozenTensorsChanged, TrainError
from ckptsurgery.train.heads import find_head, replace_head


def quiet(_: str) -> None:
    pass


def run(tmp_path: Path, **options: Any) -> Any:
    options.setdefault("data", str(tmp_path / "data"))
    options.setdefault("out", str(tmp_path / "run"))
    options.setdefault("transform", TransformConfig(image_size=32))
    options.setdefault("batch_size", 4)
    options.setdefault("epochs", 1)
    return train(TrainConfig(**options), log=quiet, show=quiet)


def random_weights(tmp_path: Path, spec: str, args: dict[str, Any]) -> Path:
    """A 'pretrained' checkpoint: a model with randomised weights and BN statistics."""
    torch.manual_seed(123)
    model = build_model(spec, args, device="cpu").module
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) * 0.2 + (0.9 if "running_var" in name else 0.0))
    path = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "args", "head"),
    [("torchvision:resnet18", {}, "fc"), (TINY_VIT, TINY_VIT_ARGS, "heads.head")],
)
def test_linear_probe_leaves_the_backbone_and_bn_buffers_bit_identical(
    tmp_path: Path, spec: str, args: dict[str, Any], head: str
) -> None:
    make_images(tmp_path / "data", size=32, per_class={"train": 4, "val": 1})
    weights = random_weights(tmp_path, spec, args)
    result = run(
        tmp_path,
        model=spec,
        model_args=args,
        weights=str(weights),
        mode="linear-probe",
        lr=0.5,
        epochs=2,
    )
    loaded = load_file(str(weights))
    last = load_file(str(tmp_path / "run" / "last.safetensors"))
    assert set(last) == set(loaded)
    backbone = [k for k in loaded if not k.startswith(head + ".")]
    assert any("running_mean" in k for k in backbone) == (head == "fc")
    for key in backbone:
        assert raw(last[key]) == raw(loaded[key]), key
    assert last[f"{head}.weight"].shape == (3, loaded[f"{head}.weight"].shape[1])
    # The head did train: it is not its N(0, 0.01) start any more.
    assert float(last[f"{head}.bias"].abs().max()) > 0
    assert result.report.dropped_mismatched  # the 1000-class head was dropped for its shape


def test_frozen_bn_stays_in_eval_mode_and_a_changed_buffer_is_caught() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    head = find_head(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("3."))
    frozen = frozen_batchnorms(model, head)
    assert frozen == [model[1]]
    before = frozen_digests(model, head)
    assert set(before) == {
        "0.weight", "0.bias", "1.weight", "1.bias",
        "1.running_mean", "1.running_var", "1.num_batches_tracked",
    }  # fmt: skip
    train_mode(model, frozen)
    assert model.training and not model[1].training and model[3].training
    model(torch.randn(2, 3, 1, 1))
    verify_frozen(model, head, before)  # eval-mode BN: nothing moved
    model.train()  # a stray train(): the next forward updates the running statistics
    model(torch.randn(2, 3, 1, 1))
    with pytest.raises(FrozenTensorsChanged, match=r"1\.running_mean") as e:
        verify_frozen(model, head, before)
    assert "1.num_batches_tracked" in e.value.changed


def test_recalibrate_bn_is_the_exact_average_over_the_batches() -> None:
    bn = nn.BatchNorm1d(3, momentum=0.3)
    model = nn.Sequential(bn)
    model.eval()
    batches = [torch.randn(4, 3) + 5, torch.randn(4, 3) - 1]
    n = recalibrate_bn(model, batches)
    assert n == 2
    expected = torch.stack([b.mean(0) for b in batches]).mean(0)
    assert torch.allclose(bn.running_mean, expected, atol=1e-6)
    assert bn.momentum == 0.3 and not model.training


def test_outputs_reload_strictly_and_metrics_have_one_line_per_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tiny_nets(tmp_path)
    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "data", classes=6, size=16)
    result = run(
        tmp_path,
        model="tinynets:TinyCNN",
        mode="discriminative",
        epochs=3,
        lr=0.05,
        transform=TransformConfig(image_size=16),
        scheduler="step",
        step_size=1,
    )
    out = tmp_path / "run"
    expected = ["last.safetensors", "best.safetensors", "last_state.pt", "config.json"]
    expected += ["metrics.jsonl"] + (["curves.png"] if find_spec("matplotlib") else [])
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert set(records[0]) >= {"epoch", "train_loss", "val_loss", "top1", "top5", "lr", "seconds"}
    assert records[0]["top5"] is not None  # 6 classes
    assert records[1]["lr"]["head"] == pytest.approx(10 * records[1]["lr"]["backbone"])
    assert records[1]["lr"]["backbone"] == pytest.approx(0.005)  # step decay after epoch 1
    assert result.best_epoch == max(records, key=lambda r: (r["top1"], -r["val_loss"]))["epoch"]
    config = json.loads((out / "config.json").read_text())
    assert config["mode"] == "discriminative" and config["derived"]["head"] == "fc"
    assert config["derived"]["classes"] == [f"c{i}" for i in range(6)]
    # The files load strictly into a model built the usual way with the new class count.
    fresh = build_model("tinynets:TinyCNN", {"num_classes": 6}, device="cpu").module
    for name in ("best.safetensors", "last.safetensors"):
        fresh.load_state_dict(load_file(str(out / name)), strict=True)
    state = torch.load(out / "last_state.pt", weights_only=True)
    assert state["epoch"] == 3 and state["format"].startswith("ckptsurgery.train-state/")


def test_from_scratch_is_seeded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    training_folder(tmp_path, monkeypatch)
    options: dict[str, Any] = {"model": "tinynets:TinyCNN", "mode": "full"}
    options["transform"] = TransformConfig(image_size=16, augment=True)
    run(tmp_path, out=str(tmp_path / "a"), **options)
    run(tmp_path, out=str(tmp_path / "b"), **options)
    run(tmp_path, out=str(tmp_path / "c"), seed=1, **options)
    a, b, c = (load_file(str(tmp_path / x / "last.safetensors")) for x in "abc")
    assert all(raw(a[k]) == raw(b[k]) for k in a)
    assert any(raw(a[k]) != raw(c[k]) for k in a)


@pytest.mark.slow
def test_resume_reaches_the_same_result_as_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptsurgery.train import outputs

    write_tiny_nets(tmp_path)
    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "data", per_class={"train": 5, "val": 2})
    options: dict[str, Any] = {
        "model": "tinynets:TinyCNN",
        "model_args": {"dropout": 0.3},
        "mode": "discriminative",
        "epochs": 4,
        "warmup_epochs": 1,
        "lr": 0.05,
        "transform": TransformConfig(image_size=16, augment=True),
        "seed": 7,
    }
    run(tmp_path, out=str(tmp_path / "straight"), **options)

    real_save = outputs.save_state
    saved = []

    def interrupt_after_two(path: Path, state: dict[str, Any]) -> None:
        real_save(path, state)
        saved.append(state["epoch"])
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "save_state", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, out=str(tmp_path / "resumed"), **options)
    monkeypatch.setattr(outputs, "save_state", real_save)
    # A line for an epoch that was not saved in the state is dropped when resuming.
    metrics = tmp_path / "resumed" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + json.dumps({"epoch": 3}) + "\n")
    result = run(tmp_path, out=str(tmp_path / "resumed"), resume=True, **options)
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3, 4]

    for name in ("last.safetensors", "best.safetensors"):
        a = load_file(str(tmp_path / "straight" / name))
        b = load_file(str(tmp_path / "resumed" / name))
        assert list(a) == list(b)
        assert all(raw(a[k]) == raw(b[k]) for k in a), name

    def lines(run_dir: str) -> list[dict[str, Any]]:
        text = (tmp_path / run_dir / "metrics.jsonl").read_text()
        return [
            {k: v for k, v in json.loads(x).items() if not k.endswith("seconds")}
            for x in text.split("\n")
            if x
        ]

    assert lines("straight") == lines("resumed")


def test_resume_refuses_other_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    training_folder(tmp_path, monkeypatch)
    options: dict[str, Any] = {"model": "tinynets:TinyCNN", "mode": "full"}
    options["transform"] = TransformConfig(image_size=16)
    run(tmp_path, **options)
    with pytest.raises(TrainError, match=r"these options differ.*lr"):
        run(tmp_path, resume=True, lr=0.5, **options)


def test_a_model_that_returns_a_tuple_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    training_folder(tmp_path, monkeypatch)
    with pytest.raises(TrainError, match="returned a tuple, not a tensor of logits"):
        run(
            tmp_path,
            model="tinynets:TupleOut",
            mode="full",
            transform=TransformConfig(image_size=16),
        )


def test_replace_head_then_bn_recalibrate_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    training_folder(tmp_path, monkeypatch)
    run(
        tmp_path,
        model="tinynets:TinyCNN",
        mode="full",
        bn="recalibrate",
        transform=TransformConfig(image_size=16),
    )
    last = load_file(str(tmp_path / "run" / "last.safetensors"))
    # Recalibrated statistics are a cumulative average over the whole training set: one
    # running_mean per channel of the first BatchNorm, computed in one pass.
    assert last["features.1.running_mean"].abs().sum() > 0
    model = build_model("tinynets:TinyCNN", device="cpu").module
    replace_head(model, find_head(model), 3)
    model.load_state_dict(last, strict=True)


def test_early_stop_after_patience_epochs_without_a_better_top1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    training_folder(tmp_path, monkeypatch)
    # An lr too small to change a float32 weight: every epoch evaluates the same.
    result = run(
        tmp_path,
        model="tinynets:TinyCNN",
        mode="linear-probe",
        lr=1e-30,
        epochs=5,
        early_stop=2,
        transform=TransformConfig(image_size=16),
    )
    assert result.stopped_early
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3]
    assert result.best_epoch == 1
    again = run(
        tmp_path,
        model="tinynets:TinyCNN",
        mode="linear-probe",
        lr=1e-30,
        epochs=5,
        early_stop=2,
        transform=TransformConfig(image_size=16),
        resume=True,
    )
    assert again.stopped_early and len(again.metrics) == 3


def test_steps_are_reported_to_a_callback_and_epochs_to_the_log(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The library draws nothing: steps go to ``on_step`` (throttled, the last one always),
    the epoch's line to ``log``; the command line draws the bar with tqdm."""
    import io

    from ckptsurgery.render.progress import step_progress
    from ckptsurgery.train.runtime import Progress

    lines: list[str] = []
    steps: list[tuple[int, int, int, int, float]] = []
    record = {"epoch": 1, "train_loss": 0.5, "val_loss": 0.4, "top1": 0.75, "top5": None}
    record |= {"lr": {"head": 0.1}, "seconds": 1.25, "best": True}
    reporter = Progress(lambda *a: steps.append(a), 4, lines.append, epochs=2)
    for step in range(4):
        reporter.step(0, step, torch.tensor(0.25))
    reporter.epoch_line(record, 2)
    assert steps[0] == (1, 2, 1, 4, 0.25) and steps[-1] == (1, 2, 4, 4, 0.25)
    assert lines == [
        "epoch 1/2: train loss 0.5000, val loss 0.4000, top1 0.7500, lr head=0.1, 1.2s *best*"
    ]
    quiet = Progress(None, 4, lines.append, epochs=2)
    for step in range(4):
        quiet.step(0, step, torch.tensor(0.25))
    assert capsys.readouterr().err == ""

    stream = io.StringIO()
    with step_progress(True, stream=stream) as on_step:
        assert on_step is not None
        for args in steps:
            on_step(*args)
    drawn = stream.getvalue()
    assert "epoch 1/2" in drawn and "4/4" in drawn and "loss 0.2500" in drawn
    with step_progress(None, stream=io.StringIO()) as none:  # not a terminal: no bar
        assert none is None
