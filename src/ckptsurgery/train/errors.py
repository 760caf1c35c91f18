"""The trainer's errors, all in the :class:`~ckptsurgery.errors.CheckpointError` family.

::

    CheckpointError
    └── TrainError                  a training run that cannot start or must not be trusted
        ├── DataError               the data folder is missing, empty or inconsistent
        ├── HeadError               no classifier head found, or one the trainer cannot replace
        ├── GroupCheckError         the optimizer groups fail a check made before step 1
        └── FrozenTensorsChanged    a tensor that had to stay frozen changed during training
"""

from __future__ import annotations

from ckptsurgery.errors import CheckpointError


class TrainError(CheckpointError):
    """A training or evaluation run that cannot start, or whose result must not be trusted."""


class DataError(TrainError):
    """The data folder is missing, has no classes or images, or its splits disagree."""


class HeadError(TrainError):
    """No classifier head found, or the head found cannot be replaced (aux heads, no Linear)."""


class GroupCheckError(TrainError):
    """The optimizer's parameter groups do not hold exactly the trainable parameters."""


class FrozenTensorsChanged(TrainError):
    """A tensor of the frozen backbone (parameter or buffer) is not bit-identical after training."""

    def __init__(self, message: str, *, changed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.changed = changed
