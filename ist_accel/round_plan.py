"""What a round end moves, planned one round ahead (IST Alg. 1's redistribution step).

The *fields* of a round are every tensor that travels: the global model's parameters and
float buffers, then (optimizer policy ``carry``, or an outer momentum) one field per
travelling optimizer-state key of each trained parameter. :class:`RoundPlanner` builds the
:class:`~ist_accel.transfer.TransferPlan` of round ``r -> r+1`` right after the sync of
``r - 1``, while round ``r`` trains, and binds each field to this group's tensors at the
sync (:meth:`RoundPlanner.bind`).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from typing import Any

import torch

from .decompositions import Assignment, Decomposition
from .outer import MOMENTUM_KEY
from .transfer import FieldSpec, Layout, TransferPlan, build_plan, layouts

State = dict[str, dict[str, Any]]
StateKeys = tuple[tuple[str, bool], ...]  # (optimizer-state key, whether it is a scalar)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: the few thousand short-lived objects of a
    plan or a sync would otherwise trigger full collections of the whole process heap
    (torch, transformers: about a million objects), measured at ~50 ms each here."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def tensor_state_keys(state: State) -> StateKeys:
    """Tensor-valued optimizer-state keys of ``state`` (and whether each is a scalar), in a
    fixed order. Derived from this rank's state; the agreement check confirms every rank has
    the same field list."""
    keys: dict[str, bool] = {}
    for st in state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k not in keys:
                keys[k] = v.dim() == 0
    return tuple(sorted(keys.items()))


class RoundPlanner:
    """The fields, layouts and plan of the coming round end, for one subnet group."""

    def __init__(self, decomposition: Decomposition, base_fields: list[FieldSpec], param_names: set[str],
                 group_index: int, num_subnets: int, device: torch.device) -> None:
        self.decomposition, self.base_fields, self.param_names = decomposition, base_fields, param_names
        self.group_index, self.S, self.device = group_index, num_subnets, device
        self.plan: TransferPlan | None = None
        self.seconds = 0.0  # of building the current plan
        self._assignment: Assignment | None = None

    def fields(self, state: State, moves_state: bool) -> list[FieldSpec]:
        """Every tensor that travels this round; with ``moves_state``, one field per
        optimizer-state entry of ``state`` of each trained parameter."""
        fields = list(self.base_fields)
        keys = tensor_state_keys(state) if moves_state else ()
        for f in self.base_fields:
            if f.frozen or f.name not in self.param_names:
                continue
            for key, scalar in keys:
                fields.append(FieldSpec(f"{f.name}:{key}", torch.Size([]) if scalar else f.shape,
                                        torch.float32 if scalar else f.dtype, source=f.name, scalar=scalar))
        return fields

    def planned_state_keys(self) -> StateKeys:
        """The optimizer-state keys the current plan moves (the outer momentum is not one)."""
        fields = self.plan.fields if self.plan is not None else []
        return tuple(sorted({(f.name.rpartition(":")[2], f.scalar) for f in fields if f.source}
                            - {(MOMENTUM_KEY, False)}))

    def assignment(self, round_: int) -> Assignment:
        """The decomposition's assignment of ``round_`` (kept for the round ahead: the plan
        and the sync both need it)."""
        if self._assignment is None or self._assignment.round != round_:
            self._assignment = self.decomposition.assignment(round_)
        return self._assignment

    def layouts(self, assignment: Assignment) -> dict[str, Layout]:
        """Where every base field's elements sit under ``assignment``."""
        d = self.decomposition
        return layouts(self.base_fields, [d.pieces(assignment, s) for s in range(self.S)])

    def prepare(self, round_: int, current: dict[str, Layout], state: State, moves_state: bool) -> float:
        """Build the plan of round ``round_``'s end (``round_ -> round_ + 1``) from the
        current layouts (:meth:`fields` of ``state``); returns its seconds (also kept in
        :attr:`seconds`)."""
        start = time.perf_counter()
        with gc_paused():
            fields = self.fields(state, moves_state)
            following = self.layouts(self.assignment(round_ + 1))
            self.plan = build_plan(fields, current, following, self.group_index, self.S, round_)
            self.plan.to(self.device)
        self.seconds = time.perf_counter() - start
        return self.seconds

    @staticmethod
    def bind(plan: TransferPlan, values: dict[str, torch.Tensor], state: State
             ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Each field's tensor in this group now and next round (values or state entries)."""
        current, targets = {}, {}
        for i, f in enumerate(plan.fields):
            now, nxt = plan.names(i)
            key = f.name.partition(":")[2]
            for name, out in ((now, current), (nxt, targets)):
                if name is not None:
                    out[i] = state[name][key] if key else values[name]
        return current, targets


__all__ = ["RoundPlanner", "gc_paused", "tensor_state_keys"]
