"""A recipe process's life: logging set-up, a failure told to the other ranks (every rank
stops with the message of the rank whose failure started it), and the exit."""

from __future__ import annotations

import logging
import os
import sys

from ..faults import (ISTError, ISTPeerFailure, ISTSyncError, is_communication_error, peer_failed, peer_failures,
                      record_failure, sync_failure)

logger = logging.getLogger(__name__)

FAILURE_WAIT_SECONDS = 5.0  # a failing rank waits this long for the others to read why, before it exits


def reported_failure(error: Exception) -> Exception:
    """A failure, told to the other ranks (or, if a peer failed first, with its reason):
    every rank stops with the message of the rank whose failure started it."""
    if not isinstance(error, ISTError) and is_communication_error(error):  # a gather, barrier or store outside
        error = sync_failure(error)  # the round engine (evaluation, checkpoint): the engine's ISTSyncError
    logger.error("%s: %s", type(error).__name__, error)  # now, not after the wait below
    if isinstance(error, ISTPeerFailure):
        return error
    peers = peer_failures()
    if isinstance(error, ISTSyncError):  # a consequence (a peer died or stalled), not a cause to tell the others
        if peers and not all(p in str(error) for p in peers):
            return ISTSyncError(f"{error}. Reported by the peer(s): {'; '.join(peers)}")
        return error
    if not peers:  # this rank's own failure: the others stop with its message
        record_failure(f"{type(error).__name__}: {error}", wait_for_peers=FAILURE_WAIT_SECONDS)
    return error


def stop_if_a_peer_failed() -> None:
    if peer_failed():
        reasons = "; ".join(peer_failures()) or "no reason recorded"
        raise ISTPeerFailure(f"stopping: another rank failed ({reasons})")


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)


def finish(code: int = 0) -> None:
    """End a recipe process: flush, leave the process group, and exit without running
    interpreter teardown, where gloo sometimes aborts after the work is done."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


__all__ = ["FAILURE_WAIT_SECONDS", "finish", "reported_failure", "setup_logging", "stop_if_a_peer_failed"]
