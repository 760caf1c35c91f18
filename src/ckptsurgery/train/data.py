"""ImageFolder data for training and evaluation: splits, transforms by options, loaders.

A data folder holds ``train/<class>/*`` and ``val/<class>/*`` (or ``test/<class>/*``), as
torchvision's ``ImageFolder`` reads them: classes are the sub-folder names, sorted. Training
needs ``train`` and one of ``val``/``test`` with the same classes. Evaluation uses ``test``,
else ``val``, else the folder itself when it holds the class folders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptsurgery.train.config import TransformConfig
from ckptsurgery.train.errors import DataError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader, Dataset

__all__ = [
    "Splits",
    "build_transform",
    "default_workers",
    "eval_folder",
    "folder_classes",
    "image_folder",
    "make_loader",
    "train_splits",
]


@dataclass(frozen=True)
class Splits:
    train: Path
    val: Path  # the evaluation split: val/ or test/
    classes: tuple[str, ...]


def train_splits(data: str | os.PathLike[str]) -> Splits:
    """``DIR/train`` and ``DIR/val`` (else ``DIR/test``), checked to hold the same classes."""
    root = _existing_dir(data)
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{str(root)!r} has no 'train' folder; expected {root}/train/<class>/*")
    classes = folder_classes(train)
    val = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if val is None:
        raise DataError(
            f"{str(root)!r} has no 'val' or 'test' folder to evaluate on; "
            f"expected {root}/val/<class>/* or {root}/test/<class>/*"
        )
    val_classes = folder_classes(val)
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))[:3]
        only_val = sorted(set(val_classes) - set(classes))[:3]
        raise DataError(
            f"{train} and {val} hold different classes (only in train: {only_train or 'none'}; "
            f"only in {val.name}: {only_val or 'none'}); class indices would not agree"
        )
    return Splits(train, val, classes)


def eval_folder(data: str | os.PathLike[str]) -> Path:
    """``DIR/test``, else ``DIR/val``, else ``DIR`` itself."""
    root = _existing_dir(data)
    for split in ("test", "val"):
        if (root / split).is_dir():
            return root / split
    return root


def build_transform(options: TransformConfig, *, train: bool) -> Any:
    """The torchvision transform for ``options`` (augmentation only when ``train``)."""
    import importlib

    T: Any = importlib.import_module("torchvision.transforms")  # torchvision has no type hints

    mean, std = options.normalization()
    size = options.image_size
    steps: list[Any] = []
    if options.channels == 1:
        steps.append(T.Grayscale(num_output_channels=1))
    if train and options.augment:
        steps += [T.RandomResizedCrop(size, scale=(0.5, 1.0)), T.RandomHorizontalFlip()]
    else:
        steps += [T.Resize(size), T.CenterCrop(size)]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def image_folder(folder: Path, transform: Any, *, allow_empty: bool = False) -> Any:
    """A torchvision ``ImageFolder`` whose errors are :class:`DataError` naming the folder."""
    import importlib

    ImageFolder = importlib.import_module("torchvision.datasets").ImageFolder

    folder_classes(folder)
    try:
        return ImageFolder(str(folder), transform=transform, allow_empty=allow_empty)
    except FileNotFoundError as e:
        raise DataError(f"{folder}: {e}") from None


def default_workers() -> int:
    """Data-loading processes for this machine: 0 (load in the main process) on <= 2 cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores - 1)


def make_loader(
    dataset: Dataset[Any],
    *,
    batch_size: int,
    shuffle: bool,
    workers: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    sampler: Any = None,
) -> DataLoader[Any]:
    """A DataLoader; pinned memory when the batches go to a GPU."""
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=generator,
        persistent_workers=False,
    )


def _existing_dir(data: str | os.PathLike[str]) -> Path:
    root = Path(data)
    if not root.exists():
        raise DataError(f"data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} is not a folder")
    return root


def folder_classes(folder: Path) -> tuple[str, ...]:
    try:
        classes = tuple(sorted(e.name for e in os.scandir(folder) if e.is_dir()))
    except OSError as e:
        raise DataError(f"{folder} cannot be read: {e}") from None
    if not classes:
        raise DataError(f"{folder} holds no class folders; expected {folder}/<class>/<image>")
    if len(classes) < 2:
        raise DataError(f"{folder} holds one class ({classes[0]}); a classifier needs at least two")
    return classes
