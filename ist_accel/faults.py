"""Failures a long run must survive, and a way to cause them on purpose.

Errors raised by the round engine (every rank raises the same one, so no rank is left
waiting), and fault injection for tests and drills: ``IST_FAULT`` is a comma-separated
list of ``kind:rank=R:step=K[:point=P]`` with kind ``kill`` (SIGKILL this process),
``stop`` (SIGSTOP this process: a stalled peer, alive but silent), ``nan`` (poison this
rank's subnet) or ``enospc`` (raise ``OSError(ENOSPC)``, as a full disk does), fired when
rank R reaches optimizer step K at point ``step`` (after the optimizer step, before any
sync), ``sync`` (inside the round's exchange) or ``save`` (half-way through writing a
checkpoint).

A rank that fails for its own reason (a bad image, a full disk) says why in the process
group's store (:func:`record_failure`), so the others can report the cause
(:func:`peer_failures`) instead of only "connection closed by peer"."""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

POINTS = ("step", "sync", "save")
KINDS = ("kill", "stop", "nan", "enospc")
FAILURE_KEY = "ist_accel/failure/{rank}"
FAILURE_COUNT = "ist_accel/failures"  # how many ranks recorded a failure (one store.add to check)
ACK_COUNT = "ist_accel/failure_acks"  # how many ranks read them
STORE_DEADLINE = 2.0  # seconds a failing rank waits on a store it cannot reach, to record why
_state = {"recorded": False, "acknowledged": False}


class ISTError(RuntimeError):
    """Base class of the round engine's errors."""


class ISTAgreementError(ISTError):
    """Ranks disagree on something they must share (round, config, assignment, model)."""


class ISTNonFiniteError(ISTError):
    """A subnet's update holds NaN or Inf (policy ``nonfinite="raise"``)."""


class ISTSyncError(ISTError):
    """A synchronization failed: a peer died, stalled past the timeout, or the network broke."""


class ISTPeerFailure(ISTError):
    """Another rank failed for its own reason (recorded with :func:`record_failure`): this
    rank stops too, with that rank's message."""


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int
    point: str = "step"


def parse_faults(spec: str | None) -> list[Fault]:
    """Parse ``IST_FAULT``; raise ``ValueError`` naming the bad entry."""
    faults = []
    for entry in filter(None, (spec or "").split(",")):
        kind, *fields = entry.strip().split(":")
        try:
            values = dict(f.split("=", 1) for f in fields)
            fault = Fault(kind, int(values.pop("rank")), int(values.pop("step")), values.pop("point", "step"))
        except (KeyError, ValueError):
            raise ValueError(f"IST_FAULT entry {entry!r}: expected kind:rank=R:step=K[:point=P]") from None
        if values or fault.kind not in KINDS or fault.point not in POINTS:
            raise ValueError(f"IST_FAULT entry {entry!r}: kind in {KINDS}, point in {POINTS}, no other fields")
        faults.append(fault)
    return faults


_FAULTS = parse_faults(os.environ.get("IST_FAULT"))


def inject(point: str, rank: int, step: int, tensors: Iterable[torch.Tensor] = ()) -> None:
    """Fire the faults planned for (point, rank, step)."""
    for fault in _FAULTS:
        if (fault.point, fault.rank, fault.step) != (point, rank, step):
            continue
        logger.warning("IST_FAULT: %s on rank %d at step %d (%s), pid %d", fault.kind, rank, step, point, os.getpid())
        if fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.kind == "stop":
            for handler in logging.getLogger().handlers:  # the warning out before the process freezes
                handler.flush()
            os.kill(os.getpid(), signal.SIGSTOP)
            continue
        if fault.kind == "enospc":
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (IST_FAULT enospc at {point}, step {step})")
        with torch.no_grad():
            for t in tensors:
                if t.is_floating_point():
                    t.view(-1)[0] = float("nan")
                    break


def _store_and_rank() -> tuple[object, int, int] | None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist.distributed_c10d._get_default_store(), dist.get_rank(), dist.get_world_size()


def record_failure(message: str, wait_for_peers: float = 0.0) -> bool:
    """Write why this rank fails into the default process group's store (key
    ``ist_accel/failure/<rank>``), for the other ranks to report; only a rank's first failure
    is recorded (the cause, not its consequences). With ``wait_for_peers``, wait up to that
    many seconds for every other rank to have read it or failed too (a launcher such as
    torchrun stops the other workers as soon as this one exits, before they could say why).
    Never raises; returns whether it was recorded (False without a process group or when
    the store is gone)."""
    try:
        found = _store_and_rank()
        if found is None:
            return False
        store, rank, world = found
        with _store_deadline(STORE_DEADLINE):  # a store it cannot reach: a few seconds, not the sync timeout
            if not _state["recorded"]:  # the first failure is the cause; what follows from it is not recorded
                store.set(FAILURE_KEY.format(rank=rank), str(message)[:4000])
                store.add(FAILURE_COUNT, 1)
                _state["recorded"] = True
            deadline = time.monotonic() + wait_for_peers
            while time.monotonic() < deadline and store.add(ACK_COUNT, 0) + store.add(FAILURE_COUNT, 0) < world:
                time.sleep(0.05)
        return True
    except Exception as error:  # the store's host may be dead: nothing to tell anyone
        logger.debug("could not record the failure in the store: %s", error)
        return False


def peer_failed() -> bool:
    """Whether another rank recorded a failure: one store round trip, cheap enough for every
    step. False when there is no process group or the store fails for another reason; raises
    :class:`ISTSyncError` when the connection to the store is lost (a cut link, the main node
    down), within the sync timeout (:func:`~ist_accel.lifecycle.bound_store_connection`),
    since no collective can succeed either."""
    try:
        found = _store_and_rank()
        if found is None:
            return False
        return found[0].add(FAILURE_COUNT, 0) > int(_state["recorded"])
    except Exception as error:
        if is_communication_error(error):
            raise store_lost(error) from error
        return False


def store_lost(error: Exception) -> ISTSyncError:
    """The error of a rank that lost its connection to the rendezvous store."""
    from .lifecycle import store_address

    rank = _this_rank()
    try:
        address = store_address()
    except Exception:
        address = None
    where = f" at {address[0]}:{address[1]}" if address else ""
    return ISTSyncError(
        f"{rank} lost its connection to the rendezvous store{where} ({type(error).__name__}: {error}): the network "
        "link between this node and the main node (machine rank 0, where the launcher hosts the store) is down, or "
        "the process hosting the store died. No collective can succeed: every rank stops. Bring the network back "
        "and restart every node from the last checkpoint (the recipes: --resume auto)")


def is_communication_error(error: BaseException) -> bool:
    """A collective or the store failed (a dead or stalled peer, a cut link, a timeout)."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe", "peer"))


def sync_failure(error: BaseException, timeout: float | None = None, what: str = "a collective",
                 reasons: Iterable[str] = ()) -> ISTSyncError:
    """A collective, barrier or store call failed (the engine's sync, an evaluation's gather, a
    checkpoint's barrier): one :class:`ISTSyncError` wording for all, with what failed peers said."""
    from .lifecycle import applied_sync_timeout

    timeout = applied_sync_timeout() if timeout is None else timeout
    limit = f" ({timeout:g} s)" if timeout else ""
    said = f" A peer reported: {'; '.join(reasons)}." if reasons else ""
    return ISTSyncError(
        f"{what} failed on {_this_rank()}: {type(error).__name__}: {error}.{said} A peer process probably died, "
        f"stalled or lost its network link past the sync timeout{limit}; restart from the last checkpoint on every "
        "node (the recipes: --resume auto)")


def _this_rank() -> str:
    """``"rank R"`` for messages, ``"this rank"`` without a process group."""
    try:
        import torch.distributed as dist

        return f"rank {dist.get_rank()}"
    except Exception:
        return "this rank"


@contextlib.contextmanager
def _store_deadline(seconds: float) -> Iterator[None]:
    """Bound this process's store connection by ``seconds`` for a few calls (a failing rank
    must not wait the whole sync timeout again on a store it cannot reach), then restore."""
    from .lifecycle import bound_store_connection

    bound = bound_store_connection(seconds)
    try:
        yield
    finally:
        if bound:
            bound_store_connection()


def peer_failures(timeout: float = 2.0, include_self: bool = False) -> list[str]:
    """What other ranks recorded with :func:`record_failure`, as ``"rank R: message"``
    (reading them lets a rank waiting in ``record_failure`` go on). Waits at most about
    ``timeout`` seconds in all (the store's host may be stalled or dead); never raises."""
    try:
        found = _store_and_rank()
        if found is None:
            return []
        store, me, world = found
    except Exception:
        return []
    out = []
    previous = None
    try:
        previous = store.timeout
        store.set_timeout(datetime.timedelta(seconds=timeout))
        with _store_deadline(timeout):  # the store's timeout bounds waits for keys, not a lost connection
            for rank in range(world):
                if rank == me and not include_self:
                    continue
                key = FAILURE_KEY.format(rank=rank)
                if store.check([key]):
                    out.append(f"rank {rank}: {store.get(key).decode(errors='replace')}")
            if out and not _state["acknowledged"] and not _state["recorded"]:
                store.add(ACK_COUNT, 1)
                _state["acknowledged"] = True
    except Exception as error:
        logger.debug("could not read peer failures from the store: %s", error)
    finally:
        if previous is not None:
            try:
                store.set_timeout(previous)
            except Exception:
                pass
    return out


__all__ = ["Fault", "ISTAgreementError", "ISTError", "ISTNonFiniteError", "ISTPeerFailure", "ISTSyncError", "inject",
           "is_communication_error", "parse_faults", "peer_failed", "peer_failures", "record_failure", "store_lost",
           "sync_failure"]
