"""timm's fine-tuning recipe in the trainer: EMA, gradient clipping and accumulation, label
smoothing and mixup / cutmix, bf16 autocast on the CPU, channels-last, torch.compile, top-k
keeping and averaging. Each test fails if its option is ignored."""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_error, cli_run, import_source
from safetensors.torch import load_file
from test_train_support import make_images
from torch import nn

from ckptsurgery.models import build_model
from ckptsurgery.train import TrainConfig, TransformConfig, evaluate, train
from ckptsurgery.train.distributed import from_env
from ckptsurgery.train.ema import Ema, ema_decay
from ckptsurgery.train.errors import TrainError
from ckptsurgery.train.heads import find_head, replace_head
from ckptsurgery.train.mixing import Mixup, smooth_one_hot, soft_target_cross_entropy
from ckptsurgery.train.runtime import Progress
from ckptsurgery.train.schedule import build_scheduler
from ckptsurgery.train.step import Stepper

RECIPE_NETS = """
import torch
from torch import nn

SEEN = []  # (autocast enabled on the CPU, its dtype, input channels-last, compiling)


class Plain(nn.Module):
    '''No BatchNorm, no dropout: a batch of 4B is the mean of four batches of B.'''

    def __init__(self, num_classes=10, channels=1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class Normed(Plain):
    def __init__(self, num_classes=10, channels=1):
        super().__init__(num_classes, channels)
        self.features.insert(1, nn.BatchNorm2d(8))


class Recorder(Normed):
    def forward(self, x):
        SEEN.append(
            (
                torch.is_autocast_enabled("cpu"),
                torch.get_autocast_dtype("cpu"),
                x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                torch.compiler.is_compiling(),
            )
        )
        return super().forward(x)
"""

GRAY = TransformConfig(image_size=8, channels=1)


def digits_tree(root: Path, *, train: int = 4, val: int = 2) -> Path:
    """An ImageFolder tree of the UCI digits (8x8, scikit-learn's copy, ``train`` and ``val``
    images per digit); synthetic 10-class images when scikit-learn is not installed."""
    if importlib.util.find_spec("sklearn") is None:
        return make_images(root, classes=10, size=8, per_class={"train": train, "val": val})
    from PIL import Image
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    for digit in range(10):
        ids = np.flatnonzero(labels == digit)
        for split, chosen in (("train", ids[:train]), ("val", ids[train : train + val])):
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = (images[i].reshape(8, 8) * (255 / 16)).round().astype(np.uint8)
                Image.fromarray(pixels, "L").save(folder / f"{i:04d}.png")
    return root


@pytest.fixture
def nets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    yield from import_source(tmp_path, "recipenets", RECIPE_NETS, monkeypatch)


@pytest.fixture
def digits(tmp_path: Path) -> Path:
    return digits_tree(tmp_path / "digits")


def quiet(_: str) -> None:
    pass


def run(tmp_path: Path, data: Path, name: str = "run", **options: Any) -> Any:
    options.setdefault("model", "recipenets:Normed")
    options.setdefault("mode", "full")
    options.setdefault("transform", GRAY)
    options.setdefault("batch_size", 8)
    options.setdefault("epochs", 1)
    options.setdefault("lr", 0.05)
    config = TrainConfig(data=str(data), out=str(tmp_path / name), **options)
    return train(config, log=quiet, show=quiet)


class StepRecorder:
    """A global optimizer step pre-hook: the global L2 norm of the gradients each step."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def __call__(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    def __enter__(self) -> StepRecorder:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self.handle = register_optimizer_step_pre_hook(self)
        return self

    def __exit__(self, *_: object) -> None:
        self.handle.remove()


# -- EMA ------------------------------------------------------------------------------------


def test_ema_decay_is_model_ema_v3s() -> None:
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    model = nn.Linear(2, 2)
    for warmup in (True, False):
        ref = timm_ema.ModelEmaV3(model, decay=0.998, use_warmup=warmup)
        for step in (1, 2, 3, 10, 100, 10_000, 10**7):
            assert ema_decay(0.998, step, warmup=warmup) == pytest.approx(ref.get_decay(step))
    assert ema_decay(0.9, 1) == 0.0  # the first update copies the model
    assert ema_decay(0.9, 3) == pytest.approx(1 - 3 ** (-2 / 3))


def test_ema_updates_match_model_ema_v3_parameters_and_buffers() -> None:
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3))
    ours = Ema(model, 0.99, warmup=True)
    ref = timm_ema.ModelEmaV3(model, decay=0.99, use_warmup=True)
    for step in range(1, 7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(5, 1, 3, 3))  # moves the BN statistics
        ours.update(model)
        ref.update(model, step=step)
    mine, theirs = ours.module.state_dict(), ref.module.state_dict()
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-6, atol=1e-7)
    assert not torch.equal(mine["0.weight"], model.state_dict()["0.weight"])
    assert ours.updates == 6


def test_ema_is_evaluated_each_epoch_and_saved(tmp_path: Path, nets: Any, digits: Path) -> None:
    result = run(tmp_path, digits, ema=0.9, epochs=2)
    out = tmp_path / "run"
    for record in result.metrics:
        assert set(record["ema"]) == {"val_loss", "top1", "top5"}
        assert record["ema"]["top5"] is not None  # 10 classes: top-5 too
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["ema"] == result.metrics[-1]["ema"]
    ema, last = load_file(out / "ema.safetensors"), load_file(out / "last.safetensors")
    assert ema.keys() == last.keys()
    assert not torch.equal(ema["fc.weight"], last["fc.weight"])  # an average, not the weights
    # The file is the EMA as evaluated: evaluating it again gives the recorded numbers.
    again = evaluate("recipenets:Normed", out / "ema.safetensors", digits, transform=GRAY)
    assert again.metrics.top1 == pytest.approx(result.metrics[-1]["ema"]["top1"])
    assert again.metrics.loss == pytest.approx(result.metrics[-1]["ema"]["val_loss"], rel=1e-5)
    state = torch.load(out / "last_state.pt", weights_only=True)
    assert state["ema_updates"] == 2 * 5  # 40 images in batches of 8, two epochs


# -- clipping and accumulation -----------------------------------------------------------------


def test_clip_grad_bounds_the_global_norm_at_every_step(
    tmp_path: Path, nets: Any, digits: Path
) -> None:
    with StepRecorder() as unclipped:
        run(tmp_path, digits, "free", lr=0.5)
    bound = min(unclipped.norms) / 4  # every step's gradient is larger than this
    with StepRecorder() as clipped:
        run(tmp_path, digits, "clipped", lr=0.5, clip_grad=bound)
    assert len(clipped.norms) == len(unclipped.norms) == 5
    assert max(clipped.norms) <= bound * (1 + 1e-5)
    assert min(clipped.norms) >= bound * 0.99  # clipped to the bound, not below it


def test_accumulating_four_batches_takes_the_step_of_one_four_times_larger(
    tmp_path: Path, nets: Any, digits: Path
) -> None:
    options: dict[str, Any] = {"model": "recipenets:Plain", "epochs": 2, "lr": 0.2}
    with StepRecorder() as small:
        accumulated = run(tmp_path, digits, "accum", batch_size=2, accum_steps=4, **options)
    with StepRecorder() as big:
        whole = run(tmp_path, digits, "big", batch_size=8, **options)
    assert len(small.norms) == len(big.norms) == 2 * 5  # 40 images: 5 steps an epoch
    torch.testing.assert_close(small.norms, big.norms, rtol=1e-4, atol=1e-6)
    # The scheduler counts optimizer steps: the same lr at the start of epoch 2.
    assert accumulated.metrics[1]["lr"] == pytest.approx(whole.metrics[1]["lr"])
    a = load_file(tmp_path / "accum" / "last.safetensors")
    b = load_file(tmp_path / "big" / "last.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert accumulated.metrics[-1]["train_loss"] == pytest.approx(
        whole.metrics[-1]["train_loss"], rel=1e-4
    )


# -- label smoothing, mixup, cutmix ------------------------------------------------------------


def stepper(model: nn.Module, config: TrainConfig, num_classes: int) -> Stepper:
    optimizer = torch.optim.SGD([{"params": list(model.parameters()), "name": "all"}], lr=config.lr)
    scheduler = build_scheduler(optimizer, "none", epochs=1, steps_per_epoch=1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return Stepper(
        config,
        model,
        model,
        optimizer,
        scheduler,
        scaler,
        torch.device("cpu"),
        num_classes,
        from_env(),
    )


def one_batch_loss(config: TrainConfig, x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    """The loss the trainer's step computes for one batch ``(x, y)`` of a seeded model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 5))
    s = stepper(model, config, 5)
    progress = Progress(None, 1, quiet)
    total, seen = s.epoch([(x.clone(), y)], 0, progress, rng=np.random.RandomState(seed))  # type: ignore[arg-type]
    return float(total) / seen


def seeded_logits(x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 5))
    with torch.no_grad():
        return model(x)


def test_label_smoothing_is_its_definition_and_timms() -> None:
    torch.manual_seed(1)
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    config = TrainConfig(model="m", data="d", out="o", label_smoothing=0.3)
    got = one_batch_loss(config, x, y, seed=0)
    logp = torch.log_softmax(seeded_logits(x), dim=-1)
    nll = -logp[torch.arange(6), y]
    direct = (0.7 * nll + 0.3 * (-logp.mean(dim=-1))).mean()
    assert got == pytest.approx(float(direct), rel=1e-6)
    plain = one_batch_loss(TrainConfig(model="m", data="d", out="o"), x, y, seed=0)
    assert plain == pytest.approx(float(nll.mean()), rel=1e-6) and plain != pytest.approx(got)
    timm_loss = pytest.importorskip("timm.loss")
    ref = timm_loss.LabelSmoothingCrossEntropy(0.3)(seeded_logits(x), y)
    assert got == pytest.approx(float(ref), rel=1e-6)
    targets = smooth_one_hot(y, 5, 0.3)
    assert targets.sum(dim=1).tolist() == pytest.approx([1.0] * 6)
    assert float(soft_target_cross_entropy(seeded_logits(x), targets)) == pytest.approx(got)


@pytest.mark.parametrize(
    ("mixup", "cutmix", "prob"),
    [(0.4, 0.0, 1.0), (0.0, 1.0, 1.0), (0.8, 1.0, 1.0), (0.4, 0.0, 0.5)],
)
def test_mixup_and_cutmix_mix_as_timm_does(mixup: float, cutmix: float, prob: float) -> None:
    timm_mixup = pytest.importorskip("timm.data.mixup")
    timm_loss = pytest.importorskip("timm.loss")
    torch.manual_seed(2)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 1])
    for seed in range(6):  # mixed or not, mixup or cutmix, different boxes
        ours = Mixup(
            mixup_alpha=mixup,
            cutmix_alpha=cutmix,
            prob=prob,
            label_smoothing=0.1,
            num_classes=5,
            rng=np.random.RandomState(seed),
        )
        ref = timm_mixup.Mixup(
            mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, label_smoothing=0.1, num_classes=5
        )
        np.random.seed(seed)
        x_ref, t_ref = ref(x.clone(), y)
        x_ours = x.clone()
        t_ours = ours(x_ours, y)
        torch.testing.assert_close(x_ours, x_ref)
        torch.testing.assert_close(t_ours, t_ref)
        # The trainer's step: the loss of the mixed batch against the mixed targets.
        config = TrainConfig(
            model="m", data="d", out="o", mixup=mixup, cutmix=cutmix, mix_prob=prob,
            label_smoothing=0.1,
        )  # fmt: skip
        got = one_batch_loss(config, x, y, seed)
        want = timm_loss.SoftTargetCrossEntropy()(seeded_logits(x_ref), t_ref)
        assert got == pytest.approx(float(want), rel=1e-6)


def test_mixup_definition_without_timm() -> None:
    x = torch.stack([torch.full((1, 2, 2), float(i)) for i in range(4)])
    y = torch.tensor([0, 1, 2, 3])
    mix = Mixup(mixup_alpha=1.0, num_classes=4, label_smoothing=0.0, rng=np.random.RandomState(3))
    mixed = x.clone()
    t = mix(mixed, y)
    lam = mix.last_lam
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(t[0], torch.tensor([lam, 0, 0, 1 - lam]))
    cut = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=4, rng=np.random.RandomState(3))
    pasted = x.clone()
    cut(pasted, y)
    changed = (pasted[0] != x[0]).float().mean().item()
    assert changed == pytest.approx(1 - cut.last_lam)  # lam is the kept area


# -- precision, memory format, compile ---------------------------------------------------------


def test_bf16_autocast_runs_on_the_cpu_and_channels_last_reaches_the_model(
    tmp_path: Path, nets: Any, digits: Path
) -> None:
    run(tmp_path, digits, "plain", model="recipenets:Recorder")
    assert {s[:3] for s in nets.SEEN} == {(False, torch.bfloat16, False)}
    nets.SEEN.clear()
    result = run(tmp_path, digits, "bf16", model="recipenets:Recorder", amp="bf16")
    assert {s[:2] for s in nets.SEEN} == {(True, torch.bfloat16)}  # training and evaluation
    assert result.metrics[0]["train_loss"] > 0
    nets.SEEN.clear()
    # Three channels: with one, NCHW and NHWC are the same layout.
    rgb = {"model_args": {"channels": 3}, "transform": TransformConfig(image_size=8, channels=3)}
    run(tmp_path, digits, "nhwc", model="recipenets:Recorder", channels_last=True, **rgb)
    assert {s[2] for s in nets.SEEN} == {True}
    nets.SEEN.clear()
    run(tmp_path, digits, "nchw", model="recipenets:Recorder", **rgb)
    assert {s[2] for s in nets.SEEN} == {False}
    last = load_file(tmp_path / "nhwc" / "last.safetensors")
    fresh = build_model("recipenets:Recorder", {"num_classes": 10, "channels": 3}, device="cpu")
    fresh.module.load_state_dict(last, strict=True)


def test_fp16_on_the_cpu_is_a_clear_error(tmp_path: Path, nets: Any, digits: Path) -> None:
    with pytest.raises(TrainError, match="needs a CUDA device"):
        run(tmp_path, digits, amp="fp16", device="cpu")
    result = cli_run(
        "train", "--model", "recipenets:Normed", "--data", digits, "-o", tmp_path / "x",
        "--mode", "full", "--device", "cpu", "--amp", "fp16",
    )  # fmt: skip
    assert_error(result, "--amp fp16", "CUDA")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # inductor compiles C++ on the CPU: about a minute on two cores
def test_compile_trains_the_compiled_model_and_saves_plain_keys(
    tmp_path: Path, nets: Any, digits: Path
) -> None:
    run(tmp_path, digits, "compiled", model="recipenets:Recorder", compile=True, ema=0.5)
    assert any(s[3] for s in nets.SEEN)  # the training forward was traced by torch.compile
    out = tmp_path / "compiled"
    for name in ("last.safetensors", "best.safetensors", "ema.safetensors"):
        sd = load_file(out / name)
        assert not any("_orig_mod" in k for k in sd)
        fresh = build_model("recipenets:Recorder", {"num_classes": 10}, device="cpu").module
        fresh.load_state_dict(sd, strict=True)
    state = torch.load(out / "last_state.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in state["model"])


# -- top-k keeping and averaging ---------------------------------------------------------------


def test_keep_top_k_and_average_top_k(tmp_path: Path, nets: Any, digits: Path) -> None:
    result = run(tmp_path, digits, epochs=4, lr=0.1, keep_top_k=2, average_top_k=True)
    out = tmp_path / "run"
    ranked = sorted(result.metrics, key=lambda m: (-m["top1"], m["val_loss"], m["epoch"]))
    best_two = [m["epoch"] for m in ranked[:2]]
    kept = sorted((out / "top_k").iterdir())
    assert [p.name for p in kept] == [f"epoch-{e:03d}.safetensors" for e in sorted(best_two)]
    assert result.averaged["epochs"] == best_two
    averaged = load_file(out / "averaged.safetensors")
    sources = [load_file(p) for p in kept]
    assert averaged.keys() == sources[0].keys()
    for k, v in averaged.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (sources[0][k] + sources[1][k]) / 2)
    fresh = build_model("recipenets:Normed", {"num_classes": 10}, device="cpu").module
    fresh.load_state_dict(averaged, strict=True)
    again = evaluate("recipenets:Normed", out / "averaged.safetensors", digits, transform=GRAY)
    assert again.metrics.top1 == pytest.approx(result.averaged["top1"])
    assert json.loads((out / "averaged.json").read_text())["epochs"] == best_two


def test_resume_continues_the_ema_mixing_and_kept_checkpoints(
    tmp_path: Path, nets: Any, digits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptsurgery.train import outputs

    options: dict[str, Any] = {
        "epochs": 3, "ema": 0.8, "mixup": 0.4, "cutmix": 1.0, "accum_steps": 2,
        "keep_top_k": 2, "average_top_k": True, "label_smoothing": 0.1, "seed": 3,
    }  # fmt: skip
    straight = run(tmp_path, digits, "straight", **options)
    real_save = outputs.save_state

    def stop_after_two(path: Path, state: dict[str, Any]) -> None:
        real_save(path, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "save_state", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, digits, "resumed", **options)
    monkeypatch.setattr(outputs, "save_state", real_save)
    resumed = run(tmp_path, digits, "resumed", resume=True, **options)

    def timeless(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in m.items() if "seconds" not in k} for m in metrics]

    assert timeless(resumed.metrics) == timeless(straight.metrics)  # EMA metrics included
    assert resumed.averaged == straight.averaged
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert sorted(p.name for p in (a / "top_k").iterdir()) == sorted(
        p.name for p in (b / "top_k").iterdir()
    )
    for name in ("last.safetensors", "ema.safetensors", "averaged.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert all(torch.equal(x[k], y[k]) for k in x), name


def test_recipe_options_are_checked() -> None:
    base = {"model": "m", "data": "d", "out": "o"}
    for bad, match in (
        ({"clip_grad": 0.0}, "--clip-grad"),
        ({"accum_steps": 0}, "--accum-steps"),
        ({"label_smoothing": 1.0}, "--label-smoothing"),
        ({"mixup": -1.0}, "--mixup"),
        ({"ema": 1.0}, "--ema"),
        ({"mix_prob": 0.5}, "--mix-prob"),
        ({"average_top_k": True}, "--keep-top-k"),
        ({"amp": "fp8"}, "--amp"),
    ):
        with pytest.raises(TrainError, match=match):
            TrainConfig(**base, **bad)
    assert TrainConfig(**base, amp=True).amp == "fp16"  # type: ignore[arg-type]  # the old flag


# -- timm models ---------------------------------------------------------------------------


def test_timm_model_head_is_reset_through_reset_classifier(tmp_path: Path, digits: Path) -> None:
    pytest.importorskip("timm")
    model = build_model("timm:test_resnet", device="cpu").module
    head = find_head(model)
    assert head.how == "timm get_classifier()"
    new = replace_head(model, head, 10, generator=torch.Generator().manual_seed(0))
    assert "reset_classifier(10)" in new.how
    assert model.num_classes == 10 and model.get_classifier().out_features == 10  # type: ignore[union-attr]
    before = copy.deepcopy(model.get_classifier().weight.detach())  # type: ignore[union-attr]
    assert float(before.std()) == pytest.approx(0.01, rel=0.2)
    result = run(
        tmp_path, digits, model="timm:test_resnet", transform=TransformConfig(image_size=16),
        ema=0.9,
    )  # fmt: skip
    assert result.head.name == "fc" and "reset_classifier" in result.head.how
    assert result.metrics[0]["ema"]["top1"] >= 0
