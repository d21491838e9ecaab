"""Failures a long run must survive, and a way to cause them on purpose.

Errors raised by the round engine (every rank raises the same one, so no rank is left
waiting), and fault injection for tests and drills: ``IST_FAULT`` is a comma-separated
list of ``kind:rank=R:step=K[:point=P]`` with kind ``kill`` (SIGKILL this process) or
``nan`` (poison this rank's subnet), fired when rank R reaches optimizer step K at point
``step`` (after the optimizer step, before any sync), ``sync`` (inside the round's
exchange) or ``save`` (half-way through writing a checkpoint)."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

POINTS = ("step", "sync", "save")
KINDS = ("kill", "nan")


class ISTError(RuntimeError):
    """Base class of the round engine's errors."""


class ISTAgreementError(ISTError):
    """Ranks disagree on something they must share (round, config, assignment, model)."""


class ISTNonFiniteError(ISTError):
    """A subnet's update holds NaN or Inf (policy ``nonfinite="raise"``)."""


class ISTSyncError(ISTError):
    """A synchronization failed: a peer died, stalled past the timeout, or the network broke."""


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
        logger.warning("IST_FAULT: %s on rank %d at step %d (%s)", fault.kind, rank, step, point)
        if fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        with torch.no_grad():
            for t in tensors:
                if t.is_floating_point():
                    t.view(-1)[0] = float("nan")
                    break


__all__ = ["Fault", "ISTAgreementError", "ISTError", "ISTNonFiniteError", "ISTSyncError", "inject", "parse_faults"]
