"""Atomic, verifiable checkpoint folders.

A checkpoint is written into ``<name>.partial`` and renamed to ``<name>`` only when every
rank has finished and ``MANIFEST.json`` (each file's size and SHA-256) is in place, so a
crash while saving leaves the previous checkpoint untouched and never a folder that looks
complete. Loading checks the manifest first: a truncated, altered or foreign folder gets a
clear error, never a partial load.

One naming scheme for every writer (the recipes' ``--checkpoint-every`` and
``ISTAccelerator.save_state()`` with automatic naming): ``<run folder>/checkpoints/step_<8 digits>``,
named by the optimizer step it resumes at (:func:`checkpoint_path`, :func:`complete_checkpoints`).
Folders ``checkpoints/checkpoint_<n>`` (ISTAccelerator's automatic names before) are still
found when no ``step_*`` folder exists.

Every rank agrees on the outcome of a save (:func:`raise_unless_all_saved`) and of a
load's shape check (:func:`raise_unless_all_fit`) in one collective over the default group."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .faults import peer_failures, record_failure

MANIFEST = "MANIFEST.json"
FORMAT = "ist_accel.checkpoint/1"
PARTIAL = ".partial"
ROOT = "checkpoints"
STEP_NAME = re.compile(r"step_(\d+)")
LEGACY_NAME = re.compile(r"checkpoint_(\d+)")  # ISTAccelerator's automatic names before: found, not written


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


# ---- naming and discovery ----------------------------------------------------------


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    """The folder holding a run's checkpoints: ``<run_dir>/checkpoints``."""
    return Path(run_dir) / ROOT


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint taken after ``step`` optimizer steps goes: ``checkpoints/step_<8 digits>``."""
    return checkpoint_root(run_dir) / f"step_{step:08d}"


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's complete checkpoints (with a manifest; an interrupted save has none), oldest
    first; the older ``checkpoint_<n>`` folders when no ``step_*`` folder exists."""
    root = checkpoint_root(run_dir)
    for pattern in (STEP_NAME, LEGACY_NAME):
        found = [(int(m.group(1)), p) for p in root.glob("*") if (m := pattern.fullmatch(p.name)) and is_complete(p)]
        if found:
            return [p for _, p in sorted(found)]
    return []


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Remove all but the newest ``keep`` complete ``step_*`` checkpoints (``keep`` <= 0: none)."""
    if keep <= 0:
        return
    for old in [p for p in complete_checkpoints(run_dir) if STEP_NAME.fullmatch(p.name)][:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---- agreement across ranks ----------------------------------------------------------


def _world() -> tuple[int, int, torch.device]:
    """(rank, world size, device for a flag tensor) of the default group; (0, 1, cpu) without one."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1, torch.device("cpu")
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def raise_unless_all_saved(failure: BaseException | None, where: str | os.PathLike,
                           partial: str | os.PathLike | None = None, *, what: str = "saving checkpoint",
                           exchange: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Did every rank write its part of ``where``? A collective over torch.distributed's
    default group (it doubles as a barrier; a no-op without a group), or ``exchange``: a
    function taking this rank's one-element flag and returning every rank's, stacked by
    rank (the engine passes its transport's, so the flags are counted on its ledger). ``failure``: this
    rank's error, or ``None``. If any rank failed, rank 0 removes the incomplete ``partial``
    folder (when given) and every rank raises :class:`CheckpointSaveError` naming the failed
    ranks and why (this rank's error, or the reasons peers recorded with
    :func:`~ist_accel.faults.record_failure`), with the free space left on ``where``'s file
    system; its ``errno`` is the failing error's (``ENOSPC`` for a full disk)."""
    where = Path(where)
    rank, world, device = _world()
    mine = ""
    if failure is not None:
        try:
            left = shutil.disk_usage(where.parent).free
            free = f"; {left} bytes free on {where.parent}'s file system" + (": the disk is full" if left < 1 << 20 else "")
        except OSError:
            free = ""
        mine = f"rank {rank}: {type(failure).__name__}: {failure}{free}"
        record_failure(f"{what} {where} failed: {type(failure).__name__}: {failure}{free}")
    if exchange is not None:
        flags = exchange(torch.tensor([int(failure is not None)], dtype=torch.int64, device=device)).flatten()
    else:
        flags = torch.zeros(world, dtype=torch.int64, device=device)
        flags[rank] = int(failure is not None)
        if world > 1:
            dist.all_reduce(flags)
    failed = flags.nonzero().flatten().tolist()
    if not failed:
        return
    if rank == 0 and partial is not None:
        shutil.rmtree(partial, ignore_errors=True)
    reasons = [mine] if mine else [m for m in peer_failures() if int(m.split(":")[0].split()[1]) in failed]
    advice = (f"the incomplete {Path(partial).name} was removed and earlier checkpoints are untouched. Free disk space "
              "(or choose another --output-dir) and resume from the last checkpoint") if partial is not None else \
        "Free disk space (or choose another folder) and save again"
    error = CheckpointSaveError(f"{what} {where} failed on rank(s) {failed} "
                                f"({'; '.join(reasons) or 'no reason recorded'}); {advice}")
    own = getattr(failure, "errno", None)
    error.errno = own if own is not None else (errno.ENOSPC if "No space left" in str(reasons) else None)
    raise error from failure


def raise_unless_all_fit(problem: str | None, where: str | os.PathLike) -> None:
    """Refuse a checkpoint on every rank alike (a collective over the default group):
    ``problem`` is this rank's :func:`shape_mismatch` sentence, or ``None``; if any rank has
    one, every rank raises :class:`CheckpointError` (the rank with the problem names it)."""
    _, world, device = _world()
    flags = torch.tensor([int(problem is not None)], dtype=torch.int64, device=device)
    if world > 1:
        dist.all_reduce(flags)
    if problem is not None:
        raise CheckpointError(f"{where}: {problem}")
    if int(flags.item()):
        raise CheckpointError(f"{Path(where).parent}: another rank's state does not fit this run's model "
                              "(its error names the tensor and both shapes)")


__all__ = ["CheckpointError", "CheckpointSaveError", "checkpoint_path", "checkpoint_root", "complete_checkpoints",
           "is_complete", "partial_path", "prune_checkpoints", "publish", "raise_unless_all_fit",
           "raise_unless_all_saved", "shape_mismatch", "verify", "write_manifest"]
