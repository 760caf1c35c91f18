"""What a training run writes to OUTDIR, each file atomically.

- ``last.safetensors``, ``best.safetensors``: the model's state dict as evaluated (head
  included, in the target model's naming), with the run's facts in the safetensors metadata
  (``ckptsurgery.train``: model, head, classes, epoch). At the end of a run each is loaded into
  a freshly built model with ``load_state_dict(strict=True)`` and compared bit by bit.
- ``last_state.pt``: what ``--resume`` needs, as plain containers (``torch.save`` of dicts,
  lists, numbers, strings and tensors; read back with ``weights_only=True``): the format tag,
  the config, the completed epoch count, the model, optimizer and scheduler state dicts, the
  GradScaler state, the best epoch so far and the early-stop counter. No RNG state is needed:
  every epoch reseeds from ``(seed, epoch)``.
- ``config.json``: the options and what the run derived (head, classes, groups, versions).
- ``metrics.jsonl``: one JSON object per epoch.
- ``ema.safetensors`` (``--ema``): the moving average of the weights, as evaluated.
- ``top_k/epoch-NNN.safetensors`` (``--keep-top-k``), ``averaged.safetensors`` and
  ``averaged.json`` (``--average-top-k``): see :mod:`ckptsurgery.train.keep`.
- ``curves.png``: loss, accuracy and lr per epoch, when matplotlib is installed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptsurgery.errors import OutputError
from ckptsurgery.io import atomic_write
from ckptsurgery.train.errors import TrainError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "OUTPUT_NAMES",
    "STATE_FORMAT",
    "append_metrics",
    "check_reload",
    "digests",
    "load_state",
    "prepare_outdir",
    "read_metrics",
    "save_state",
    "save_weights",
    "write_json",
    "write_metrics",
]

STATE_FORMAT = "ckptsurgery.train-state/1"
OUTPUT_NAMES = (
    "last.safetensors",
    "best.safetensors",
    "last_state.pt",
    "config.json",
    "metrics.jsonl",
    "ema.safetensors",
    "averaged.safetensors",
    "averaged.json",
    "curves.png",
    "top_k",
)


def prepare_outdir(
    out: str | os.PathLike[str], *, resume: bool, force: bool, check_only: bool = False
) -> Path:
    """Make OUTDIR ready: refuse to mix with an earlier run unless resuming or forced.

    ``force`` deletes the earlier run's files (only those); ``check_only`` makes the checks
    and changes nothing.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output folder {str(path)!r} is a file")
    if resume:
        if not (path / "last_state.pt").is_file():
            raise OutputError(
                f"--resume: {str(path)!r} holds no last_state.pt to continue from; "
                "run without --resume to start"
            )
        return path
    existing = [n for n in OUTPUT_NAMES if (path / n).exists()]
    if existing and not force:
        raise OutputError(
            f"{str(path)!r} already holds a training run ({', '.join(existing)}); pass "
            "--resume to continue it or --force to replace it"
        )
    if check_only:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder {str(path)!r}: {e}") from None
    for name in existing:
        if (path / name).is_dir():
            import shutil

            shutil.rmtree(path / name)
        else:
            (path / name).unlink()
    return path


def save_weights(
    model: nn.Module, path: Path, *, metadata: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Write the model's state dict (on the CPU) to ``path``; returns what was written."""
    from ckptsurgery.surgery import save_state_dict

    sd = cpu_state_dict(model)
    meta = json.dumps(dict(metadata), default=repr)  # a --model-arg may be a set or bytes
    save_state_dict(sd, path, metadata={"ckptsurgery.train": meta})
    return sd


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` detached on the CPU; tied tensors stay one tensor."""
    copies: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if id(v) not in copies:
            copies[id(v)] = v.detach().cpu()
        out[k] = copies[id(v)]
    return out


def check_reload(path: Path, fresh: nn.Module, expected: Mapping[str, str]) -> None:
    """Load ``path`` into ``fresh`` strictly and compare every tensor's digest to ``expected``.

    ``fresh`` is a newly built model with the same head; ``expected`` the digests of what was
    written (:func:`digests`). Raises :class:`TrainError` if the file does not load strictly
    or holds other values.
    """
    from ckptsurgery.surgery import load_state_dict

    sd = load_state_dict(path)
    try:
        fresh.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise TrainError(f"{path} does not load strictly into a fresh model: {e}") from None
    got = digests(fresh.state_dict())
    if got != dict(expected):
        differ = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        raise TrainError(f"{path} does not hold the weights it was written from: {differ[:3]}")


def digests(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Key -> digest of the tensor's dtype, shape and raw bytes."""
    from ckptsurgery.train.bn import tensor_digest

    return {k: tensor_digest(v) for k, v in state_dict.items()}


def save_state(path: Path, state: Mapping[str, Any]) -> None:
    """``torch.save`` of plain containers, atomically; ``format`` is added."""
    import torch

    with atomic_write(path) as f:
        torch.save({"format": STATE_FORMAT, **state}, f)


def load_state(path: Path) -> dict[str, Any]:
    """Read ``last_state.pt`` back, weights-only (no pickled code can run)."""
    import pickle

    import torch

    try:
        # The trainer's own file of plain containers; weights_only refuses anything else.
        state = torch.load(path, map_location="cpu", weights_only=True)  # noqa: TID251
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise TrainError(f"--resume: {path} cannot be read: {e}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainError(f"--resume: {path} is not a training state written by ckptsurgery train")
    return state


def write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as f:
        f.write((json.dumps(obj, indent=2, default=repr) + "\n").encode())


def append_metrics(path: Path, record: Mapping[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(dict(record)) + "\n")


def write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace ``metrics.jsonl`` with ``records`` (a resumed run drops unfinished epochs)."""
    with atomic_write(path) as f:
        f.write("".join(json.dumps(r) + "\n" for r in records).encode())


def read_metrics(path: Path, *, upto_epoch: int | None = None) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (those of epochs <= ``upto_epoch``)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    if upto_epoch is not None:
        records = [r for r in records if r["epoch"] <= upto_epoch]
    return records
