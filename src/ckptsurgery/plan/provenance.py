"""What a safetensors output records about how it was made, in ``ckptsurgery.*`` metadata.

Deterministic (no time, no host), so that the same surgery on the same inputs writes the same
bytes. Every key holds a string (JSON for structures):

- ``ckptsurgery.version``;
- ``ckptsurgery.sources``: per source its file name, digest (of the file, or of a folder's
  index or DCP metadata; hashed on a helper thread while the tensors are written) under the
  algorithm's name (``"xxh3_128": "<hex>"``, or ``"sha256"`` without xxhash), nested state
  dict key and, for merges, its rules;
- ``ckptsurgery.plan``: the mode and the operations, each with its parameters, count and key
  groups (``{"op": "cast", "dtype": "bfloat16", "from": "float32", "count": 52, ...}``);
- ``ckptsurgery.rules`` (remap) or ``ckptsurgery.merge`` and ``ckptsurgery.origin``
  (merges): the renames, and where each output tensor comes from; a method merge records its
  method and every parameter (``{"mode": "method", "method": "ties", "base": "base.pt",
  "weights": [...], "density": 0.5, "lambda": 1.0, "normalize": true}``, plus ``seed``);
- ``ckptsurgery.target`` (with a gate) and whatever the caller adds (``ckptsurgery.recipe``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptsurgery._types import PathLike
from ckptsurgery._version import __version__
from ckptsurgery.io import Checkpoint, Deferred, FileDigest, identity_file
from ckptsurgery.io.checksums import DIGEST, DIGESTS, new_digest
from ckptsurgery.keygroups import group_keys
from ckptsurgery.plan.model import Plan

__all__ = ["SourceCheck", "check_sources", "origin_groups", "provenance"]


def provenance(
    plan: Plan,
    ckpts: Sequence[Checkpoint],
    *,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str | Deferred]:
    """The ``ckptsurgery.*`` metadata of ``plan`` carried out over ``ckpts``."""
    digests = [FileDigest(identity_file(c.path)) for c in ckpts]

    def sources(hashes: Sequence[str]) -> str:
        entries = []
        for part, c, sha in zip(plan.sources, ckpts, hashes, strict=True):
            entry: dict[str, Any] = {"name": c.path.name, DIGEST: sha, "key": c.key}
            if plan.mode != "remap" and part.rules:
                entry["rules"] = part.rules.to_dict()
            entries.append(entry)
        return _json(entries)

    meta: dict[str, str | Deferred] = {
        "ckptsurgery.version": __version__,
        "ckptsurgery.sources": Deferred(
            sources(["0" * len(new_digest().hexdigest())] * len(ckpts)),
            lambda: sources([d.hexdigest() for d in digests]),
        ),
        "ckptsurgery.plan": _json(
            {
                "mode": plan.mode,
                "dtype": plan.dtype,
                "keep_dtype": list(plan.keep_dtype),
                "ops": plan.op_groups(),
            }
        ),
    }
    if plan.mode == "remap":
        meta["ckptsurgery.rules"] = plan.sources[0].rules.to_json()
    else:
        extra = dict(extra or {})
        how: dict[str, Any]
        if plan.mode == "union":
            how = {"mode": "union", "on_conflict": plan.on_conflict}
            if plan.conflicts:
                how["conflicts"] = group_keys(c.key for c in plan.conflicts)
        elif plan.mode == "method" and plan.method is not None:
            how = {
                "mode": "method",
                "method": plan.method.name,
                "base": Path(plan.sources[0].path).name,
                **plan.method.to_json(),
            }
            del how["op"]
        else:
            how = {"mode": "average", "weights": list(plan.weights or ())}
            if "weights_given" in extra:
                how["weights_given"] = extra.pop("weights_given")
        meta["ckptsurgery.merge"] = _json(how)
        meta["ckptsurgery.origin"] = _json(origin_groups(plan))
    for k, v in (extra or {}).items():
        meta[f"ckptsurgery.{k}"] = v if isinstance(v, str) else _json(v)
    return meta


def origin_groups(plan: Plan) -> list[dict[str, Any]]:
    """Where the output's tensors come from, compactly: per source a count and key groups."""
    if plan.mode in ("average", "method"):
        averaged = [e.name for e in plan.entries if not e.op.is_copy]
        copied = [e.name for e in plan.entries if e.op.is_copy]
        out: list[dict[str, Any]] = []
        if averaged:
            out.append(
                {
                    "source": "all",
                    "how": "weighted mean"
                    if plan.method is None
                    else f"{plan.method.name} of the models into the base",
                    "count": len(averaged),
                    "keys": group_keys(averaged),
                }
            )
        if copied:
            out.append(
                {
                    "source": 0,
                    "name": Path(plan.sources[0].path).name,
                    "how": "copied from the first source (integer or bool)"
                    if plan.method is None
                    else "copied from the base (integer or bool)",
                    "count": len(copied),
                    "keys": group_keys(copied),
                }
            )
        return out
    groups = []
    for i, part in enumerate(plan.sources):
        keys = [e.name for e in plan.entries if e.inputs[0].source == i]
        if keys:
            groups.append(
                {
                    "source": i,
                    "name": Path(part.path).name,
                    "count": len(keys),
                    "keys": group_keys(keys),
                }
            )
    return groups


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=repr)


@dataclass(frozen=True)
class SourceCheck:
    """A file held against the source the provenance records under its name."""

    path: str
    name: str  # the recorded source's name (the file's, or a folder's)
    algorithm: str | None  # the digest the provenance names; None: no source of that name
    recorded: str | None
    computed: str | None

    @property
    def ok(self) -> bool:
        return self.recorded is not None and self.recorded == self.computed

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "name": self.name,
            "algorithm": self.algorithm,
            "recorded": self.recorded,
            "computed": self.computed,
            "match": self.ok,
        }


def check_sources(metadata: Mapping[str, str], paths: Sequence[PathLike]) -> list[SourceCheck]:
    """Recompute the digest of each of ``paths`` (a file, or the file identifying a folder
    source) and compare it with what the output's provenance (``metadata``) records for the
    source of the same name. A path that matches no recorded name is checked against no
    digest (``ok`` is False)."""
    try:
        recorded = json.loads(metadata.get("ckptsurgery.sources", "[]"))
    except json.JSONDecodeError:
        recorded = []
    by_name = {e.get("name"): e for e in recorded if isinstance(e, dict)}
    out = []
    for path in paths:
        name = Path(path).name
        entry = by_name.get(name)
        algorithm = next((a for a in DIGESTS if entry and isinstance(entry.get(a), str)), None)
        if entry is None or algorithm is None:
            out.append(SourceCheck(str(path), name, None, None, None))
            continue
        computed = FileDigest(identity_file(path), algorithm).hexdigest()
        out.append(SourceCheck(str(path), name, algorithm, entry[algorithm], computed))
    return out
