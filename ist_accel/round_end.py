"""The end of one round (IST Alg. 1 / ResIST Alg. 1, the synchronization step), on one rank.

:func:`end_round` runs it on an engine (:class:`~ist_accel.round.IST`, through its public
state): it posts the agreement check (the flags travel while this rank packs), averages
the replicas' float buffers inside the group, turns this group's values into its
outer-step contributions, packs, waits for the verdict (policy ``skip``: the group's
update is dropped and its round-start values are packed again), wires and unpacks the
:class:`~ist_accel.transfer.TransferPlan` built ahead, applies the optimizer-state policy,
moves to the next assignment, records the round's metrics and plans the next round end.
It raises what the collectives raise; the engine's :meth:`~ist_accel.round.IST.sync`
turns those into :class:`~ist_accel.faults.ISTSyncError` (:meth:`Transport.communication`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .decompositions import keep_frozen, kept_tensors
from .exchange import Timings
from .faults import inject
from .guard import SkipSnapshot, all_finite
from .metrics import RoundMetrics, SyncCost
from .transfer import FieldSpec, TransferPlan

if TYPE_CHECKING:
    from .round import IST

State = dict[str, dict[str, Any]]


def moves_state(ist: IST) -> bool:
    """Whether optimizer-state fields travel (policy ``carry``, or an outer momentum)."""
    return ist.config.optimizer_state == "carry" or bool(ist.outer_state.momentum)


def round_state(ist: IST) -> State:
    """What travels besides values: the optimizer state (``carry``) and the outer momentum."""
    carry = ist.config.optimizer_state == "carry"
    state = ist.tensors.optimizer_state(ist.planner.planned_state_keys()) if carry else {}
    return ist.outer_state.with_momentum(state)


def take_snapshot(ist: IST) -> None:
    """The round's starting values: the outer optimizer's ``before``, and (policy ``skip``)
    a :class:`~ist_accel.guard.SkipSnapshot`."""
    ist.outer_state.take_before(ist.tensors)
    ist.snapshot = SkipSnapshot(ist.tensors, ist.outer_state.momentum) if ist.config.nonfinite == "skip" else None


def post_check(ist: IST, phase: str, fields: list[FieldSpec] | None = None) -> Callable[[], bool]:
    """:meth:`RoundGuard.post` at the engine's round and step; at a sync with the non-finite
    flag of this subnet (and, under ``carry``, of its optimizer state). Call the result for
    "must skip"."""
    finite = True
    if phase == "sync":
        values = list(ist.tensors.tensors().values())
        if ist.config.optimizer_state == "carry":
            values += [v for st in ist.tensors.optimizer_state().values() for v in st.values()
                       if isinstance(v, torch.Tensor)]
        finite = all_finite(values)
    return ist.guard.post(phase, ist.round, ist.steps, int(ist.assignment.digest()[:12], 16), fields, finite)


def _contributions(ist: IST, plan: TransferPlan, values: dict[str, torch.Tensor], state: State):
    """:meth:`RoundPlanner.bind`, after this group's values and outer momentum are turned,
    in place, into its outer-step contributions, whose average over holders the exchange
    writes back: each tensor is its own target, as the exchange expects."""
    ist.outer_state.contribute(values)
    return ist.planner.bind(plan, values, state)


def end_round(ist: IST) -> RoundMetrics:
    """End ``ist``'s round now (module docstring); returns its metrics."""
    compute = time.perf_counter() - ist.round_started
    start = time.perf_counter()
    carry = ist.config.optimizer_state == "carry"
    state = round_state(ist)
    fields = ist.planner.fields(state, moves_state(ist))
    must_skip = post_check(ist, "sync", fields)  # the flags travel while this rank packs
    if ist.intra is not None:
        ist.transport.average([b for b in ist.subnet.buffers() if b.is_floating_point()], "intra", ist.intra)
    plan_seconds = ist.planner.seconds
    if ist.planner.plan is None or ist.planner.plan.fields != fields:  # carry's first round: the state appeared
        extra = ist.planner.prepare(ist.round, ist.layouts, state, moves_state(ist))
        plan_seconds += extra
        start += extra  # planning is not part of the sync
    plan = ist.planner.plan
    values = ist.tensors.tensors()
    current, targets = _contributions(ist, plan, values, state)
    timings = Timings()
    packed = ist.exchange.pack(plan, current)
    timings.pack = time.perf_counter() - start
    check_started = time.perf_counter()
    if must_skip():  # policy skip: this group's update is dropped; pack its round-start values again
        ist.snapshot.restore(ist.tensors, ist.outer_state.momentum)
        state = round_state(ist)
        values = ist.tensors.tensors()
        current, targets = _contributions(ist, plan, values, state)
        packed = ist.exchange.pack(plan, current)
    check = time.perf_counter() - check_started
    ist.exchange.wire_and_unpack(plan, packed, targets, timings)
    inject("sync", ist.rank, ist.steps)
    following = ist.planner.assignment(ist.round + 1)
    next_pieces = ist.decomposition.pieces(following, ist.group_index)
    if not ist.tensors.live:
        ist.tensors.write(values, ist.outer_state.without_momentum(state) if carry else None)
    if ist.config.optimizer_state == "local":
        ist.tensors.keep_optimizer_state(kept_tensors(ist.pieces, next_pieces))
    elif not carry:
        ist.tensors.reset_optimizer_state()
    sync_seconds = time.perf_counter() - start
    ist.assignment, ist.pieces, ist.layouts = following, next_pieces, plan.next
    keep_frozen(ist.subnet, ist.frozen, ist.pieces)
    ist.round += 1
    ist.round_steps = 0
    metrics = ist.book.record(ist.round - 1, plan, ist.exchange.bytes_per_element,
                              SyncCost(timings, check, sync_seconds, compute, plan_seconds))
    take_snapshot(ist)
    ist.planner.prepare(ist.round, ist.layouts, state, moves_state(ist))  # round r+1 -> r+2, ahead of its sync
    for callback in ist.on_sync:
        callback(metrics)
    ist.round_started = time.perf_counter()
    return metrics


__all__ = ["end_round", "moves_state", "post_check", "round_state", "take_snapshot"]
