"""Atomic, verifiable checkpoint folders.

A checkpoint is written into ``<name>.partial`` and renamed to ``<name>`` only when every
rank has finished and ``MANIFEST.json`` (each file's size and SHA-256) is in place, so a
crash while saving leaves the previous checkpoint untouched and never a folder that looks
complete. Loading checks the manifest first: a truncated, altered or foreign folder gets a
clear error, never a partial load."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

MANIFEST = "MANIFEST.json"
FORMAT = "ist_accel.checkpoint/1"
PARTIAL = ".partial"


class CheckpointError(ValueError):
    """The folder is not a complete, intact checkpoint (or not one of this run)."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed on some rank (a full disk, a lost mount); its ``.partial``
    folder was removed and earlier checkpoints are untouched."""


def shape_mismatch(saved: dict[str, Any], live: dict[str, tuple[int, ...]], what: str) -> str | None:
    """The first tensor of ``saved`` whose shape differs from ``live`` (name -> shape), as a
    sentence naming the tensor and both shapes; ``None`` when every shared name fits."""
    for name, value in saved.items():
        if name not in live or not hasattr(value, "shape"):
            continue
        if tuple(value.shape) != tuple(live[name]):
            return (f"{what} tensor {name!r} has shape {tuple(value.shape)} in the checkpoint but {tuple(live[name])} "
                    "in this run: it was written for another model (another width or depth?)")
    return None


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + PARTIAL)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, info: dict[str, Any]) -> None:
    """Record every file of ``folder`` (size, SHA-256) and ``info``; written last, atomically."""
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    temporary = folder / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps({"format": FORMAT, **info, "files": files}, indent=1))
    os.replace(temporary, folder / MANIFEST)


def publish(partial: Path, final: Path) -> None:
    """Replace ``final`` by the finished ``partial`` (the old one is removed only afterwards)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    if old.exists():
        shutil.rmtree(old)


def verify(folder: Path) -> dict[str, Any]:
    """The manifest of an intact checkpoint; :class:`CheckpointError` naming what is wrong."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint folder {folder}")
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} is not a complete ist_accel checkpoint (no {MANIFEST}): an interrupted "
                              "save, or a folder written by something else")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{manifest_path} is damaged: {error}") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: checkpoint format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is damaged: {name} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint {folder} is damaged: {name} has {size} bytes, the manifest "
                                  f"says {expected['bytes']} (truncated?)")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {folder} is damaged: {name} does not match its SHA-256")
    return manifest


def is_complete(folder: Path) -> bool:
    """Cheap check used to pick the latest checkpoint: the manifest is there."""
    return (Path(folder) / MANIFEST).is_file() and not Path(folder).name.endswith(PARTIAL)


__all__ = ["CheckpointError", "CheckpointSaveError", "is_complete", "partial_path", "publish", "shape_mismatch", "verify",
           "write_manifest"]
