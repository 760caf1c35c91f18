"""The target model of the digits demo (``make demo``): a small CNN with its own key names.

``DigitNet`` has the architecture of the MNIST CNN that the ``digit-recognizer-py`` package
ships (three 3x3 convolutions with max-pooling, then 1152 -> 256 -> classes), but names its
layers the way this project would::

    backbone.features.{0, 3, 6}.{weight, bias}   <- conv_layers.{0, 3, 6}.*
    backbone.embed.0.{weight, bias}              <- fc_layers.0.*
    head.{weight, bias}                          <- fc_layers.2.* (replaced by a new head)

so that the checkpoint's keys do not line up and ``diff --suggest`` has something to find.
It takes 1x28x28 images, as the MNIST model was trained on. Nothing imports this module but a
model SPEC that names it (it imports torch)::

    ckptsurgery diff handwriting_model.pth --model ckptsurgery.demo_models:DigitNet --suggest
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitBackbone", "DigitNet"]


class DigitBackbone(nn.Module):
    """Three conv/ReLU/max-pool stages (``features``), then a 1152 -> 256 ``embed``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.embed(self.features(x))
        return out


class DigitNet(nn.Module):
    """A 1x28x28 digit classifier: a :class:`DigitBackbone` and a Linear ``head``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.backbone = DigitBackbone()
        self.head = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.backbone(x))
        return out
