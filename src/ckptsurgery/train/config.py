"""What a training run is: one frozen value, built the same way from CLI flags or Python.

Importing this module does not import torch, so ``import ckptsurgery`` stays cheap.

Losses are mean-reduced over the batch. A recipe written for a *summed* loss (d2l's fine-tuning
chapter: ``reduction="none"`` then ``l.sum().backward()``, lr 5e-5, batch 128, SGD weight decay
1e-3) takes the same SGD steps here with ``lr = 5e-5 * 128 = 6.4e-3`` and
``weight_decay = 1e-3 / 128 ≈ 7.8e-6``: summing multiplies the loss gradient (not the decay
term) by the batch size. Adam(W) is invariant to the loss scale, so its lr carries over as is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ckptsurgery.rules import Rules
from ckptsurgery.train.errors import TrainError

Mode = Literal["linear-probe", "full", "discriminative"]
Optimizer = Literal["sgd", "adamw"]
Scheduler = Literal["none", "step", "cosine"]
BnPolicy = Literal["eval", "recalibrate"]
Amp = Literal["fp16", "bf16"]

MODES: tuple[str, ...] = get_args(Mode)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
BN_POLICIES: tuple[str, ...] = get_args(BnPolicy)
AMPS: tuple[str, ...] = get_args(Amp)

# ImageNet statistics, the convention of torchvision's and timm's pretrained weights; one
# channel gets their luminance-weighted mean.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)

# Fields that do not change the result of a run: a resumed run may differ in these only.
RUNTIME_FIELDS = frozenset(
    {
        "out",
        "device",
        "threads",
        "workers",
        "resume",
        "force",
        "dry_run",
        "progress",
        "compile",
        "channels_last",
    }
)


@dataclass(frozen=True)
class TransformConfig:
    """How images become tensors; ``train`` and ``evaluate`` share it.

    Every image is converted to ``channels`` (1: grayscale, 3: RGB), resized so that its
    shorter side is ``image_size`` and centre-cropped to a square, then normalised with
    ``mean``/``std`` (one value per channel, or one for all; default: ImageNet's). With
    ``augment`` the training images instead get ``RandomResizedCrop(image_size, scale=(0.5,
    1))`` and a random horizontal flip.
    """

    image_size: int = 224
    channels: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: bool = False

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise TrainError(f"--image-size must be positive, got {self.image_size}")
        if self.channels not in (1, 3):
            raise TrainError(f"--channels must be 1 or 3, got {self.channels}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(float(v) for v in value)
            object.__setattr__(self, name, value)
            if len(value) not in (1, self.channels):
                raise TrainError(
                    f"--{name} needs 1 or {self.channels} values (one per channel), "
                    f"got {len(value)}: {','.join(map(str, value))}"
                )
        if self.std is not None and any(s <= 0 for s in self.std):
            raise TrainError(f"--std values must be positive, got {self.std}")

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` with one value per channel."""
        default_mean, default_std = (
            (IMAGENET_MEAN, IMAGENET_STD) if self.channels == 3 else (GRAY_MEAN, GRAY_STD)
        )
        mean = self.mean if self.mean is not None else default_mean
        std = self.std if self.std is not None else default_std
        return _per_channel(mean, self.channels), _per_channel(std, self.channels)


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run: ``model`` (a model SPEC) on the ImageFolder tree ``data``.

    ``mode`` chooses what trains: ``linear-probe`` (the head only; the backbone is frozen and
    its BatchNorm layers stay in eval mode), ``full`` (every parameter at ``lr``) or
    ``discriminative`` (the backbone at ``lr``, the head at ``lr * head_lr_mult``). Without
    ``weights`` the model trains from its own initialisation. See the module docstring for how
    the mean-reduced loss relates to summed-loss recipes.
    """

    model: str
    data: str
    out: str
    mode: Mode = "full"
    model_args: dict[str, Any] = field(default_factory=dict)
    # loading
    weights: str | None = None
    key: str | None = None
    rules: Rules = field(default_factory=Rules)
    allow_missing: tuple[str, ...] = ()
    allow_unexpected: tuple[str, ...] = ()
    allow_globals: tuple[str, ...] = ()
    unsafe_pickle: bool = False
    head: str | None = None
    # optimisation
    optimizer: Optimizer = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-3
    decay_norm_bias: bool = True  # False: no weight decay on norm layers and biases
    layer_decay: float | None = None
    epochs: int = 10
    batch_size: int = 32
    scheduler: Scheduler = "cosine"
    warmup_epochs: int = 0
    min_lr_ratio: float = 0.0
    step_size: int | None = None
    gamma: float = 0.1
    early_stop: int | None = None
    seed: int = 0
    # the timm recipe (see the README's table): regularisation, EMA, keeping
    clip_grad: float | None = None  # the global gradient norm's bound
    accum_steps: int = 1  # batches per optimizer step
    label_smoothing: float = 0.0
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0: off
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix; 0: off
    mix_prob: float = 1.0  # the chance that a batch is mixed
    mix_switch_prob: float = 0.5  # with both: the chance of cutmix rather than mixup
    ema: float | None = None  # the EMA's decay
    ema_warmup: bool = True  # ModelEmaV3's warmup of the decay
    keep_top_k: int | None = None
    average_top_k: bool = False
    # data
    transform: TransformConfig = field(default_factory=TransformConfig)
    bn: BnPolicy = "eval"
    # runtime
    device: str = "auto"
    amp: Amp | None = None  # autocast dtype: fp16 (CUDA) or bf16 (CUDA or CPU)
    channels_last: bool = False
    compile: bool = False
    threads: int | None = None
    workers: int | None = None
    resume: bool = False
    force: bool = False
    dry_run: bool = False
    progress: bool | None = None  # the CLI's bar: None on a terminal only (the library draws none)

    def __post_init__(self) -> None:
        _choice("--mode", self.mode, MODES)
        _choice("--optimizer", self.optimizer, OPTIMIZERS)
        _choice("--scheduler", self.scheduler, SCHEDULERS)
        _choice("--bn", self.bn, BN_POLICIES)
        if isinstance(self.amp, bool):  # the former flag: True meant float16
            object.__setattr__(self, "amp", "fp16" if self.amp else None)
        if self.amp is not None:
            _choice("--amp", self.amp, AMPS)
        self._check_recipe()
        object.__setattr__(self, "allow_missing", tuple(self.allow_missing))
        object.__setattr__(self, "allow_unexpected", tuple(self.allow_unexpected))
        object.__setattr__(self, "allow_globals", tuple(self.allow_globals))
        positive = {"--lr": self.lr, "--epochs": self.epochs, "--batch-size": self.batch_size}
        for flag, value in positive.items():
            if not value > 0:
                raise TrainError(f"{flag} must be positive, got {value}")
        if self.head_lr_mult <= 0:
            raise TrainError(f"--head-lr-mult must be positive, got {self.head_lr_mult}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise TrainError("--weight-decay must be >= 0 and --momentum in [0, 1)")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise TrainError(
                f"--warmup-epochs must be at least 0 and below --epochs ({self.epochs}), "
                f"got {self.warmup_epochs}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.step_size is not None and self.step_size < 1:
            raise TrainError(f"--step-size must be at least 1 epoch, got {self.step_size}")
        if self.early_stop is not None and self.early_stop < 1:
            raise TrainError(f"--early-stop must be at least 1 epoch, got {self.early_stop}")
        if self.layer_decay is not None:
            if not 0 < self.layer_decay <= 1:
                raise TrainError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
            if self.mode == "linear-probe":
                raise TrainError(
                    "--layer-decay scales the backbone's learning rates, but linear-probe "
                    "mode trains the head only; use --mode full or discriminative"
                )
        if self.threads is not None and self.threads < 1:
            raise TrainError(f"--threads must be at least 1, got {self.threads}")
        if self.workers is not None and self.workers < 0:
            raise TrainError(f"--workers must be 0 or more, got {self.workers}")
        if self.bn == "recalibrate" and self.mode == "linear-probe":
            raise TrainError(
                "--bn recalibrate re-estimates BatchNorm statistics, which in linear-probe mode "
                "belong to the frozen backbone and must stay as loaded; use --mode full or "
                "discriminative, or recalibrate the checkpoint first"
            )
        if self.rules and self.weights is None:
            raise TrainError("rule flags and --rules apply to --weights, which is not given")
        if (self.key or self.allow_globals or self.unsafe_pickle) and self.weights is None:
            raise TrainError("--key, --allow-global and --unsafe-pickle need --weights")
        if self.resume and self.force:
            raise TrainError(
                "--resume continues the run in OUTDIR and --force replaces it; pick one"
            )

    def _check_recipe(self) -> None:
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise TrainError(f"--clip-grad must be positive, got {self.clip_grad}")
        if self.accum_steps < 1:
            raise TrainError(f"--accum-steps must be at least 1, got {self.accum_steps}")
        if not 0 <= self.label_smoothing < 1:
            raise TrainError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixup < 0 or self.cutmix < 0:
            raise TrainError("--mixup and --cutmix must be 0 (off) or a positive alpha")
        for flag, p in (("--mix-prob", self.mix_prob), ("--mix-switch-prob", self.mix_switch_prob)):
            if not 0 <= p <= 1:
                raise TrainError(f"{flag} must be in [0, 1], got {p}")
        if (self.mix_prob != 1.0 or self.mix_switch_prob != 0.5) and not (
            self.mixup > 0 or self.cutmix > 0
        ):
            raise TrainError("--mix-prob and --mix-switch-prob apply to --mixup and --cutmix")
        if self.ema is not None and not 0 < self.ema < 1:
            raise TrainError(f"--ema (the decay) must be in (0, 1), got {self.ema}")
        if self.keep_top_k is not None and self.keep_top_k < 1:
            raise TrainError(f"--keep-top-k must be at least 1, got {self.keep_top_k}")
        if self.average_top_k and (self.keep_top_k is None or self.keep_top_k < 2):
            raise TrainError("--average-top-k averages the kept checkpoints: give --keep-top-k 2+")

    @property
    def mixes(self) -> bool:
        """Whether mixup or cutmix is on (the loss then takes soft targets)."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (``config.json``); :meth:`from_dict` reads them back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Rules):
                value = value.to_dict()
            elif isinstance(value, TransformConfig):
                value = dataclasses.asdict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainError(f"unknown training option {unknown[0]!r}")
        kwargs = dict(data)
        if "rules" in kwargs:
            kwargs["rules"] = Rules.from_dict(kwargs["rules"])
        if "transform" in kwargs:
            t = dict(kwargs["transform"])
            for name in ("mean", "std"):
                if t.get(name) is not None:
                    t[name] = tuple(t[name])
            kwargs["transform"] = TransformConfig(**t)
        return cls(**kwargs)

    def differences(self, other: TrainConfig) -> list[str]:
        """The result-affecting options whose values differ (runtime options are ignored)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if k not in RUNTIME_FIELDS and mine[k] != theirs.get(k)]


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise TrainError(f"{flag} must be one of {', '.join(allowed)}; got {value!r}")


def _per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    return values * channels if len(values) == 1 else values
