"""Provenance digests are recorded and checkable: ``inspect --verify-source`` recomputes them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from conftest import cli_run, source_digest
from safetensors import safe_open
from safetensors.torch import save_file

import ckptsurgery as cs
from ckptsurgery.plan.provenance import check_sources


def made(tmp_path: Path) -> tuple[Path, Path, Path]:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.pt"
    save_file({"x.w": torch.randn(3, 3)}, str(a))
    torch.save({"y.w": torch.randn(2)}, b)
    out = tmp_path / "out.safetensors"
    cs.merge_files([a, b], out)
    return a, b, out


def test_every_source_is_recorded_with_a_digest_that_checks(tmp_path: Path) -> None:
    a, b, out = made(tmp_path)
    with safe_open(str(out), "pt") as f:
        recorded = json.loads(f.metadata()["ckptsurgery.sources"])
    assert [{k: v for k, v in e.items() if k != "key"} for e in recorded] == [
        {"name": "a.safetensors", **source_digest(a)},
        {"name": "b.pt", **source_digest(b)},
    ]
    result = cli_run("inspect", out, "--verify-source", a, "--verify-source", b)
    assert result.exit_code == 0, result.output
    assert [line.split()[-1] for line in result.stdout.splitlines()[-2:]] == ["ok", "ok"]


def test_a_changed_or_unknown_source_exits_1(tmp_path: Path) -> None:
    _, b, out = made(tmp_path)
    b.write_bytes(b.read_bytes() + b"\0")  # the same name, other bytes
    stranger = tmp_path / "c.pt"
    stranger.write_bytes(b"")
    result = cli_run("inspect", out, "--verify-source", b, "--verify-source", stranger, "--json")
    assert result.exit_code == 1
    checks = json.loads(result.stdout)["verify_sources"]
    assert [c["match"] for c in checks] == [False, False]
    assert checks[0]["recorded"] != checks[0]["computed"] and checks[1]["recorded"] is None
    text = cli_run("inspect", out, "--verify-source", b)
    assert text.exit_code == 1 and "DIFFERS" in text.stdout
    assert "b.pt: differs from the recorded one" in text.stderr


def test_an_older_sha256_provenance_is_checked_with_sha256(tmp_path: Path) -> None:
    src = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    meta = {"ckptsurgery.sources": json.dumps([{"name": "m.pt", "sha256": digest, "key": None}])}
    (check,) = check_sources(meta, [src])
    assert check.ok and check.algorithm == "sha256" and check.computed == digest
