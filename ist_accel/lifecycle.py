"""A worker's life beside its launcher and its peers.

* :func:`apply_sync_timeout` puts ``ISTConfig.sync_timeout`` on every process group that
  exists (the default group however it was created: Accelerate, the HF Trainer's
  ``TrainingArguments``, DeepSpeed, or the user), so a stalled peer fails a collective
  after that long instead of torch's 30-minute gloo default.
* :func:`exit_with_parent` makes a launched worker end when its launcher dies (a SIGKILLed
  ``accelerate launch`` / ``torchrun`` would otherwise leave its workers training on, in
  their own sessions, writing into the output folder).
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import math
import os
import signal
import sys

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
# The parent when ist_accel was imported: a worker's launcher. Compared later, since a
# parent that died before PR_SET_PDEATHSIG was set sends nothing (the worker is re-parented).
_PARENT = os.getppid()
_watching = False


def apply_sync_timeout(seconds: float) -> int:
    """Set ``seconds`` as the timeout of every process group this rank belongs to (the
    default one included); returns how many groups were set. No-op without a group."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or seconds <= 0:
        raise ValueError(f"sync_timeout must be a finite number of seconds > 0, got {seconds!r}")
    if not dist.is_available() or not dist.is_initialized():
        return 0
    timeout = datetime.timedelta(seconds=seconds)
    count = 0
    for group in list(dist.distributed_c10d._world.pg_map):
        try:
            group.set_timeout(timeout)
            count += 1
        except Exception as error:  # a backend that cannot change it (MPI, UCC): say so, keep going
            logger.warning("could not set the %s s timeout on a process group: %s", seconds, error)
    return count


def group_timeouts() -> list[float]:
    """The timeout (seconds) of every gloo/nccl backend of every process group (for checks)."""
    out = []
    for group in list(dist.distributed_c10d._world.pg_map):
        for device in ("cpu", "cuda"):
            try:
                backend = group._get_backend(torch.device(device))
            except Exception:
                continue
            options = getattr(backend, "options", None)
            timeout = getattr(options, "_timeout", None)
            if timeout is not None:
                out.append(timeout.total_seconds())
    return out


def _launched() -> bool:
    """A worker started by a launcher (torchrun / accelerate launch / deepspeed / mpirun),
    not a script run from a shell (whose parent may exit, e.g. under nohup)."""
    if os.environ.get("IST_KEEP_ORPHANS", "").lower() in ("1", "true", "yes"):
        return False
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def exit_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (the launcher) dies
    (Linux ``prctl(PR_SET_PDEATHSIG)``; a no-op elsewhere), and end now if the launcher
    already died. Only for launched workers; ``IST_KEEP_ORPHANS=1`` turns it off.

    PDEATHSIG fires when the *thread* that forked this process exits: torchrun's agent (and
    ``accelerate launch``, which runs it in-process) starts workers from its main thread, so
    that thread's end is the launcher's end. Returns whether the watch is on."""
    global _watching
    if _watching:
        return True
    if not sys.platform.startswith("linux") or not _launched():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): workers will not exit with their launcher",
                           ctypes.get_errno())
            return False
    except (OSError, AttributeError) as error:
        logger.warning("prctl unavailable (%s): workers will not exit with their launcher", error)
        return False
    _watching = True
    if os.getppid() != _PARENT:  # the launcher died before the watch was set
        logger.error("the launcher (pid %d) is gone: this worker stops", _PARENT)
        os.kill(os.getpid(), sig)
    return True


__all__ = ["apply_sync_timeout", "exit_with_parent", "group_timeouts"]
