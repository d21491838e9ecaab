"""The recipes' checkpoints (``--checkpoint-every``, ``--keep-checkpoints``, ``--resume``),
named and found as :mod:`ist_accel.checkpoint` names and finds every checkpoint:
``OUTPUT_DIR/checkpoints/step_<8 digits>``."""

from __future__ import annotations

import argparse
import logging

from accelerate import Accelerator

from .. import checkpoint

logger = logging.getLogger(__name__)


def save_checkpoint(accelerator: Accelerator, args: argparse.Namespace, step: int) -> None:
    """``save_state`` after ``step`` optimizer steps; then only the newest ``--keep-checkpoints`` stay."""
    accelerator.save_state(str(checkpoint.checkpoint_path(args.output_dir, step)))
    if accelerator.is_main_process:
        checkpoint.prune_checkpoints(args.output_dir, args.keep_checkpoints)
    accelerator.wait_for_everyone()


def resume(accelerator: Accelerator, args: argparse.Namespace) -> None:
    """``--resume FOLDER``, or ``auto``: the newest complete checkpoint that verifies."""
    if args.resume != "auto":
        accelerator.load_state(args.resume)
        return
    root = checkpoint.checkpoint_root(args.output_dir)
    found = checkpoint.complete_checkpoints(args.output_dir)
    if not found:
        logger.info("--resume auto: no complete checkpoint in %s, starting fresh", root)
        return
    for folder in reversed(found):  # the newest checkpoint that verifies (every rank reads the same files)
        try:
            checkpoint.verify(folder)
        except checkpoint.CheckpointError as error:
            logger.warning("--resume auto: skipping the damaged checkpoint %s (%s); trying an older one", folder, error)
            continue
        logger.info("--resume auto: resuming from %s", folder)
        accelerator.load_state(str(folder))
        return
    raise checkpoint.CheckpointError(f"--resume auto: every checkpoint in {root} is damaged "
                                     f"({', '.join(p.name for p in found)}); remove them to start fresh")


__all__ = ["resume", "save_checkpoint"]
