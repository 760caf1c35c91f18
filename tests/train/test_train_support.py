"""Helpers for the trainer's tests: tiny ImageFolder trees and tiny models in tmp_path.

Other ``test_train_*`` / ``test_evaluate*`` modules import these functions; the few tests here
check the helpers themselves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_NETS = textwrap.dedent(
    """
    import torch
    from torch import nn


    def _features(channels):
        return nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )


    class TinyCNN(nn.Module):
        def __init__(self, num_classes=10, channels=3, dropout=0.0):
            super().__init__()
            self.features = _features(channels)
            self.drop = nn.Dropout(dropout)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.fc(self.drop(self.features(x)))


    class TinyVGG(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.features = _features(3)
            self.classifier = nn.Sequential(
                nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, num_classes)
            )

        def forward(self, x):
            return self.classifier(self.features(x))


    class Unnamed(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.body = nn.Sequential(_features(3), nn.Linear(8, 8))
            self.out = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.out(self.body(x))


    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x).mean((2, 3))


    class TupleOut(TinyCNN):
        def forward(self, x):
            logits = super().forward(x)
            return logits, logits
    """
)

# torchvision's VisionTransformer with tiny sizes, for 32x32 images.
TINY_VIT = "torchvision.models.vision_transformer:VisionTransformer"
TINY_VIT_ARGS = {
    "image_size": 32,
    "patch_size": 8,
    "num_layers": 2,
    "num_heads": 2,
    "hidden_dim": 16,
    "mlp_dim": 32,
}


def vit_model_args() -> list[str]:
    return [f"{k}={v!r}" for k, v in TINY_VIT_ARGS.items()]


def write_tiny_nets(folder: Path) -> str:
    """Write ``tinynets.py`` into ``folder`` (chdir there to use ``tinynets:TinyCNN``)."""
    (folder / "tinynets.py").write_text(TINY_NETS)
    return "tinynets"


def make_images(
    root: Path,
    *,
    classes: int = 3,
    per_class: dict[str, int] | None = None,
    size: int = 16,
    seed: int = 0,
    mode: str = "RGB",
) -> Path:
    """An ImageFolder tree: ``root/<split>/c<i>/<n>.png``, learnable by colour and position.

    Class ``i`` is noise plus a bright channel ``i % 3`` and a bright band whose position
    depends on ``i``; ``per_class`` maps split -> images per class (default train 4, val 2).
    """
    rng = np.random.default_rng(seed)
    per_class = per_class or {"train": 4, "val": 2}
    for split, n in per_class.items():
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
                a[..., c % 3] += 120
                band = (c * size) // max(classes, 1)
                a[band : band + max(1, size // classes), :, :] = 250
                img = Image.fromarray(a)
                if mode != "RGB":
                    img = img.convert(mode)
                img.save(folder / f"{i}.png")
    return root


# The flags of a tiny ``train`` run in a :func:`training_folder`.
BASE = ["--model", "tinynets:TinyCNN", "--data", "data", "--image-size", "16", "--batch-size", "4"]


def training_folder(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``folder`` as the current folder, with ``tinynets.py`` and the images of
    :func:`make_images` in ``data/``."""
    write_tiny_nets(folder)
    make_images(folder / "data")
    monkeypatch.chdir(folder)
    return folder


def run_in_session(
    argv: Sequence[str], *, cwd: Path, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in its own session; on timeout kill the whole process group and fail.

    For commands that start processes of their own (torchrun's workers, the demo's CLI
    calls): none of them outlives the test.
    """
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(argv[:4])} ... did not finish in {timeout:.0f}s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def test_make_images_writes_an_imagefolder_tree(tmp_path: Path) -> None:
    root = make_images(tmp_path / "data", classes=2, per_class={"train": 3, "test": 1})
    assert sorted(p.name for p in (root / "train").iterdir()) == ["c0", "c1"]
    assert len(list((root / "train" / "c1").glob("*.png"))) == 3
    assert len(list((root / "test" / "c0").glob("*.png"))) == 1
    with Image.open(root / "train" / "c0" / "0.png") as img:
        assert img.size == (16, 16)


def test_tiny_nets_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptsurgery.models import build_model

    write_tiny_nets(tmp_path)
    monkeypatch.chdir(tmp_path)
    built = build_model("tinynets:TinyCNN", {"num_classes": 4}, device="cpu")
    assert not built.on_meta
    assert built.module.state_dict()["fc.weight"].shape == (4, 8)
