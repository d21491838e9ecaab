"""What each round moved and cost, per rank: :class:`RoundMetrics` of one sync, the run's
:class:`Totals`, and :class:`RoundBook`, which turns the transport's byte ledger and the
sync's timings into both (the exchange's bytes against IST's lower bound, every other byte
apart; :mod:`ist_accel.accounting` gives the bound's definition).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


from .exchange import Timings
from .transfer import TransferPlan
from .transport import Transport


@dataclass
class RoundMetrics:
    """What one synchronization moved and cost, for this rank. ``bytes_*`` are the
    round's exchange (shared set and messages); ``other_bytes_sent`` everything else this
    rank sent since the previous sync (agreement checks, gathers for evaluation or saving,
    set-up). Seconds: ``sync_seconds`` = check + pack + wire + unpack; ``plan_seconds``
    building the next round's plan (after the sync, outside ``sync_seconds``)."""

    round: int
    bytes_sent: int
    bytes_received: int
    bytes_lower: float
    allreduce_bytes: int
    intra_group_bytes: int
    sync_seconds: float
    compute_seconds: float
    plan_seconds: float = 0.0
    check_seconds: float = 0.0
    pack_seconds: float = 0.0
    wire_seconds: float = 0.0
    unpack_seconds: float = 0.0
    other_bytes_sent: float = 0.0


@dataclass
class Totals:
    """The run's sums over its syncs, their history, and every byte by kind."""

    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_lower: float = 0.0
    sync_seconds: float = 0.0
    compute_seconds: float = 0.0
    rounds: int = 0
    history: list[RoundMetrics] = field(default_factory=list)
    ledger: dict[str, tuple[float, float]] = field(default_factory=dict)  # every byte, by kind (transport.KINDS)


@dataclass
class SyncCost:
    """The seconds of one sync that the engine measured (inputs of :meth:`RoundBook.record`)."""

    timings: Timings
    check: float
    sync: float
    compute: float
    plan: float


class RoundBook:
    """Keeps :class:`Totals` and the ledger as it was at the previous sync, so each sync's
    bytes are the ledger's difference since then."""

    def __init__(self, transport: Transport, group_size: int) -> None:
        self.transport, self.group_size = transport, group_size
        self.totals = Totals()
        self.ledger_at_sync = transport.ledger.copy()

    def record(self, round_: int, plan: TransferPlan, wire_bytes: float, cost: SyncCost) -> RoundMetrics:
        """The metrics of the sync that ended round ``round_`` (added to the totals);
        ``wire_bytes`` per element give the lower bound in bytes."""
        ledger = self.transport.ledger.copy()
        before = self.ledger_at_sync

        def delta(kind: str, i: int) -> float:
            return ledger.get(kind, (0.0, 0.0))[i] - before.get(kind, (0.0, 0.0))[i]

        shared = delta("shared", 0)
        sent, received = delta("exchange", 0) + shared, delta("exchange", 1) + delta("shared", 1)
        other = sum(delta(k, 0) for k in ledger if k not in ("shared", "exchange"))
        lower = plan.bound_sent * wire_bytes / self.group_size
        t = cost.timings
        metrics = RoundMetrics(round_, int(sent), int(received), lower, int(shared), int(delta("intra", 0)),
                               cost.sync, cost.compute, cost.plan, cost.check, t.pack, t.wire, t.unpack, other)
        self.ledger_at_sync = ledger
        totals = self.totals
        totals.bytes_sent += metrics.bytes_sent
        totals.bytes_received += metrics.bytes_received
        totals.bytes_lower += lower
        totals.sync_seconds += cost.sync
        totals.compute_seconds += cost.compute
        totals.rounds += 1
        totals.history.append(metrics)
        totals.ledger = ledger
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dataclasses.asdict(self.totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the totals and put the transport's ledger back where it stood."""
        totals = dict(state["totals"])
        totals["history"] = [RoundMetrics(**m) for m in totals["history"]]
        totals["ledger"] = {k: tuple(v) for k, v in totals.get("ledger", {}).items()}
        self.totals = Totals(**totals)
        for kind, (sent, received) in self.totals.ledger.items():
            self.transport.ledger[kind].sent, self.transport.ledger[kind].received = sent, received
        self.ledger_at_sync = self.transport.ledger.copy()


__all__ = ["RoundBook", "RoundMetrics", "SyncCost", "Totals"]
