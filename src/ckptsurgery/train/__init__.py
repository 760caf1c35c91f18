"""Fine-tuning a classifier on an ImageFolder tree, with weights loaded through the gate.

::

    from ckptsurgery.train import TrainConfig, TransformConfig, train, evaluate

    result = train(TrainConfig(
        model="torchvision:resnet18", data="data", out="run", mode="linear-probe",
        weights="moco_r18.safetensors", epochs=10, lr=0.1,
        transform=TransformConfig(image_size=64),
    ))
    print(result.best)            # the best epoch's metrics record
    m = evaluate("torchvision:resnet18", "run/best.safetensors", "data",
                 transform=TransformConfig(image_size=64)).metrics

The pieces are importable on their own: :mod:`.heads` (find and replace the classifier head),
:mod:`.groups` (parameter groups by name, and their checks), :mod:`.schedule` (ratio-keeping
schedules), :mod:`.bn` (BatchNorm policy and the frozen-tensor check), :mod:`.data`, :mod:`.evaluation`,
:mod:`.loading` (rules + gate + load), :mod:`.outputs`, :mod:`.loop`.

Importing this package does not import torch; :func:`train` and :func:`evaluate` do.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ckptsurgery.train.config import TrainConfig, TransformConfig
from ckptsurgery.train.errors import (
    DataError,
    FrozenTensorsChanged,
    GroupCheckError,
    HeadError,
    TrainError,
)

if TYPE_CHECKING:
    from ckptsurgery.train.evaluation import EvaluateResult
    from ckptsurgery.train.loop import TrainResult

__all__ = [
    "DataError",
    "FrozenTensorsChanged",
    "GroupCheckError",
    "HeadError",
    "TrainConfig",
    "TrainError",
    "TransformConfig",
    "evaluate",
    "train",
]


def train(
    config: TrainConfig,
    *,
    log: Callable[[str], None] | None = None,
    show: Callable[[str], None] | None = None,
    fmt: str = "simple",
    on_step: Callable[[int, int, int, int, float], None] | None = None,
) -> TrainResult:
    """Run ``config``; see :func:`ckptsurgery.train.loop.train`."""
    from ckptsurgery.train.loop import train as run

    return run(config, log=log, show=show, fmt=fmt, on_step=on_step)


def evaluate(
    model: str, weights: str | os.PathLike[str], data: str | os.PathLike[str], **options: Any
) -> EvaluateResult:
    """Loss and accuracy of a checkpoint; see :func:`ckptsurgery.train.evaluation.evaluate`."""
    from ckptsurgery.train.evaluation import evaluate as run

    return run(model, weights, data, **options)
