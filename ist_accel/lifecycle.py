"""A worker's life beside its launcher and its peers.

* :func:`apply_sync_timeout` puts ``ISTConfig.sync_timeout`` on every process group that
  exists (the default group however it was created: Accelerate, the HF Trainer's
  ``TrainingArguments``, DeepSpeed, or the user), so a stalled peer fails a collective
  after that long instead of torch's 30-minute gloo default, and bounds this process's
  connection to the rendezvous store by it (:func:`bound_store_connection`).
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
import socket
import sys

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
# The parent when ist_accel was imported: a worker's launcher. Compared later, since a
# parent that died before PR_SET_PDEATHSIG was set sends nothing (the worker is re-parented).
_PARENT = os.getppid()
_watching = False
_store_bound: float | None = None  # the seconds apply_sync_timeout put on the store connection


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
    global _store_bound
    _store_bound = float(seconds)
    bound_store_connection(seconds)
    return count


def applied_sync_timeout() -> float | None:
    """The seconds :func:`apply_sync_timeout` last set in this process (``None``: not yet)."""
    return _store_bound


def store_address() -> tuple[str, int] | None:
    """(host, port) of the TCPStore under the default process group (``None`` without one,
    or for another kind of store: a file or hash store has no connection to lose)."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    store = dist.distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if not isinstance(store, dist.TCPStore):
        return None
    return store.host, store.port


def bound_store_connection(seconds: float | None = None) -> int:
    """Make the kernel fail a request to the rendezvous store that gets no answer within
    ``seconds`` (default: what :func:`apply_sync_timeout` set); returns how many connections
    were bounded (0 off Linux, without a TCPStore, or when none was found).

    torch's TCPStore client waits for an answer with no timeout of its own (its timeout
    bounds only waits for keys): on a cut link, ``add``/``check``/``get``/``set`` sit in
    ``recv`` until TCP gives up retransmitting, about 15 minutes on Linux
    (``net.ipv4.tcp_retries2``). ``TCP_USER_TIMEOUT`` closes the connection once sent data
    stays unacknowledged that long, and keepalive probes (bounded by the same timeout)
    catch a link cut while this process waited for an answer to a request already
    acknowledged; the call then raises ``DistNetworkError`` ("Connection timed out"), and
    every later call fails at once. A store that answers slowly is not affected: its kernel
    still acknowledges. The connections are found as this process's established TCP
    sockets to the store's port (``/proc/self/net/tcp*``)."""
    seconds = _store_bound if seconds is None else seconds
    address = store_address() if seconds else None
    if address is None or not sys.platform.startswith("linux") or not hasattr(socket, "TCP_USER_TIMEOUT"):
        return 0
    count = 0
    for fd in _connections_to_port(address[1]):
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:  # a duplicate: the options are the connection's
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(seconds * 1000)))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(seconds / 3)))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(seconds / 6)))
            count += 1
        except OSError as error:  # the fd was closed meanwhile, or is not a TCP socket after all
            logger.debug("could not bound store connection fd %d: %s", fd, error)
    if not count:
        logger.debug("no connection to the store at %s:%d found to bound", *address)
    return count


def _connections_to_port(port: int) -> list[int]:
    """File descriptors of this process's established TCP connections whose remote port is ``port``."""
    inodes = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:  # sl local_address rem_address st ... inode
            fields = row.split()
            if len(fields) > 9 and fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    found = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return []
    for name in names:
        try:
            if os.readlink(f"/proc/self/fd/{name}") in inodes:
                found.append(int(name))
        except OSError:
            continue
    return found


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


__all__ = ["applied_sync_timeout", "apply_sync_timeout", "bound_store_connection", "exit_with_parent", "group_timeouts",
           "store_address"]
