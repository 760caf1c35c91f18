"""What ``inspect`` reports about a checkpoint, as one JSON-ready value."""

from __future__ import annotations

import json
from typing import Any

from ckptsurgery.io import Checkpoint

PROVENANCE_PREFIX = "ckptsurgery."


def describe(ckpt: Checkpoint, *, depth: int | None = None) -> dict[str, Any]:
    """Tensors, totals, other entries and provenance of an opened checkpoint (no data read)."""
    report: dict[str, Any] = {
        "source": str(ckpt.path),
        "format": ckpt.format,
        "key": ckpt.key,
        "tensors": [
            {"key": k, "shape": list(i.shape), "dtype": i.dtype, "numel": i.numel}
            for k, i in ckpt.infos.items()
        ],
        "total_params": ckpt.total_params,
        "total_bytes": ckpt.total_bytes,
        "other_entries": dict(ckpt.other_entries),
        "tied": dict(ckpt.aliases),
        "metadata": {k: v for k, v in ckpt.metadata.items() if not k.startswith(PROVENANCE_PREFIX)},
        "provenance": provenance(ckpt.metadata),
    }
    if depth is not None:
        report["groups"] = group_keys(ckpt, depth)
    return report


def provenance(metadata: dict[str, str]) -> dict[str, Any]:
    """The ``ckptsurgery.*`` metadata entries, JSON values decoded."""
    out: dict[str, Any] = {}
    for k, v in metadata.items():
        if k.startswith(PROVENANCE_PREFIX) and k != PROVENANCE_PREFIX + "aliases":
            try:
                out[k.removeprefix(PROVENANCE_PREFIX)] = json.loads(v)
            except json.JSONDecodeError:
                out[k.removeprefix(PROVENANCE_PREFIX)] = v
    return out


def group_keys(ckpt: Checkpoint, depth: int) -> list[dict[str, Any]]:
    """Keys grouped by their first ``depth`` dotted parts, in first-seen order."""
    groups: dict[str, dict[str, Any]] = {}
    for name, info in ckpt.infos.items():
        group = ".".join(name.split(".")[:depth])
        g = groups.setdefault(group, {"group": group, "tensors": 0, "params": 0, "bytes": 0})
        g["tensors"] += 1
        if name not in ckpt.aliases:
            g["params"] += info.numel
            g["bytes"] += info.nbytes
    return list(groups.values())


def describe_candidates(
    path: str,
    candidates: tuple[str, ...],
    *,
    allow_globals: tuple[str, ...] = (),
    unsafe_pickle: bool = False,
) -> dict[str, Any]:
    """What ``inspect`` reports about a file holding several state dicts: each candidate
    (its path inside the file, tensor and parameter counts, bytes), the other entries, and
    which one other commands would pick (none: they ask for ``--key``), with the one the names
    suggest (the EMA / teacher copy). Only headers are read."""
    from ckptsurgery.candidates import preferred
    from ckptsurgery.io import open_checkpoint

    rows: list[dict[str, Any]] = []
    fmt = ""
    other: dict[str, str] = {}
    tops = {c.split("/", 1)[0] for c in candidates}
    for key in candidates:
        with open_checkpoint(
            path, key=key, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
        ) as ckpt:
            fmt = ckpt.format
            rows.append(
                {
                    "key": key,
                    "tensors": len(ckpt.infos),
                    "params": ckpt.total_params,
                    "bytes": ckpt.total_bytes,
                }
            )
            other.update({k: v for k, v in ckpt.other_entries.items() if k not in tops})
    return {
        "source": path,
        "format": fmt,
        "key": None,
        "tensors": [],
        "total_params": 0,
        "total_bytes": 0,
        "other_entries": other,
        "candidates": rows,
        "selected": None,  # other commands refuse to guess: they ask for --key
        "preferred": preferred(candidates),
    }
