"""The user's global model module on one rank, between gathers (IST Alg. 1 evaluates the
global network; the subnets are its only trained copy).

With ``free_global`` the module holds no storage between reads. A read fills it from a
:class:`~ist_accel.global_view.GlobalView` gather (:meth:`GlobalModel.gather_state`,
:meth:`GlobalModel.fill`), or lends it to a streamed evaluation that gathers one module at
a time (:meth:`GlobalModel.streamed`); :meth:`GlobalModel.release` drops the storage again.
What a gather starts from (this group's current tensors, after the agreement check) is
:func:`read_current` of the engine.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from .decompositions import Decomposition
from .exchange import OwnerShards
from .gather_plan import GatherPlan
from .global_view import GlobalView, streamed
from .round_end import post_check
from .subnet import integer_buffer_copies
from .tensors import state_tensors
from .transfer import Layout

if TYPE_CHECKING:
    from .round import IST

logger = logging.getLogger(__name__)


def read_current(ist: IST) -> tuple[GatherPlan, dict[int, torch.Tensor]]:
    """What every read of ``ist``'s global model starts from: the agreement check, a warning
    mid-round (once per round), the round's :class:`~ist_accel.global_view.GatherPlan`, and
    this group's current tensor of each of its fields; mid-round, what a sync now would
    send: the replicas' statistics averaged and the outer step's contributions, on copies."""
    post_check(ist, "read")()
    if ist.round_steps and ist.global_model.warned_round != ist.round:
        ist.global_model.warned_round = ist.round
        logger.warning("IST: the global model is read %d steps into round %d (step %d): it is the average a "
                       "sync now would produce; the round goes on", ist.round_steps, ist.round, ist.steps)
    plan = ist.global_view.plan(ist.round, ist.planner.base_fields, ist.layouts, agreed=not ist.round_steps)
    values = ist.tensors.tensors()
    if ist.intra is not None and ist.round_steps:  # the group's replicas differ in their statistics
        names = [n for n, _ in ist.subnet.named_buffers() if n in values]
        averaged = ist.transport.average([values[n] for n in names], "intra", ist.intra, dtype=ist.values,
                                         in_place=False)
        values = {**values, **dict(zip(names, averaged))}
    if ist.round_steps and not ist.outer.is_plain_average:
        values = {**values, **ist.outer_state.contributions_of(values)}
    current = {}
    for i, f in enumerate(plan.fields):
        name = ist.layouts[f.param].subnet_names.get(ist.group_index)
        if name is not None:
            current[i] = values[name]
    return plan, current


class GlobalModel:
    """Fills, lends and releases the global model's module (module docstring)."""

    def __init__(self, model: nn.Module, decomposition: Decomposition, view: GlobalView,
                 owners: OwnerShards, device: torch.device, free: bool, meta: bool) -> None:
        self.module, self.decomposition, self.view = model, decomposition, view
        self.owners, self.device, self.free, self.meta = owners, device, free, meta
        self.warned_round = -1  # the round a mid-round read was last warned about

    def gather_state(self, plan: GatherPlan, current: Mapping[int, torch.Tensor], dst: int | None,
                     for_eval: bool = False) -> dict[str, torch.Tensor] | None:
        """The global model's tensors (fresh copies) on rank ``dst`` (``None``: every rank), a
        collective; None on the other ranks. Integer buffers are the global module's own;
        tied names share one value; the module's ``state_dict`` order comes first."""
        out = {i: torch.empty(f.shape, dtype=f.dtype, device=self.device) for i, f in enumerate(plan.fields)}
        if not self.view.gather(plan, current, self.owners.values, out, dst, lossy=for_eval):
            return None
        state = {f.name: out[i] for i, f in enumerate(plan.fields)}
        state.update(integer_buffer_copies(self.module))
        first: dict[int, str] = {}
        for name, p in self.module.named_parameters(remove_duplicate=False):  # tied names share the value
            first.setdefault(id(p), name)
            if name not in state and first[id(p)] in state:
                state[name] = state[first[id(p)]]
        return {name: state[name] for name in self.module.state_dict() if name in state} | state

    def fill(self, state: dict[str, torch.Tensor] | None) -> nn.Module | None:
        """The module holding ``state`` (a :meth:`gather_state`); None where the gather
        delivered nothing (and the storage stays dropped under ``free``)."""
        if state is None:
            if self.free:
                self.release()
            return None
        live = state_tensors(self.module)
        with torch.no_grad():
            for name, value in state.items():
                if name in live:  # (integer buffers and tied names are left as they are)
                    live[name].data = value
        return self.module

    @contextlib.contextmanager
    def streamed(self, plan: GatherPlan, layouts: Mapping[str, Layout], current: Mapping[int, torch.Tensor],
                 shared_local: bool) -> Iterator[nn.Module]:
        """The module in its evaluation view, each submodule gathered just before its forward
        and dropped after (:func:`~ist_accel.global_view.streamed`)."""
        with streamed(self.view, self.module, plan.fields, layouts, current, self.owners.values,
                      shared_local=shared_local) as model, self.decomposition.eval_view(model) as view:
            yield view

    @contextlib.contextmanager
    def eval_view(self, model: nn.Module | None) -> Iterator[nn.Module | None]:
        """``model`` (a :meth:`fill`) in its evaluation view (all units, eval scaling); the
        storage is dropped again on exit under ``free``."""
        try:
            if model is None:
                yield None
            else:
                with self.decomposition.eval_view(model) as view:
                    yield view
        finally:
            if self.free:
                self.release()

    def release(self) -> None:
        """Drop the module's storage (it is gathered again on demand). A meta-device model
        holds none."""
        with torch.no_grad():
            for t in state_tensors(self.module).values():
                if not t.is_meta:
                    t.data = torch.empty(0, dtype=t.dtype)

    def resident_elements(self) -> int:
        """Elements of whatever the module holds now."""
        return sum(t.numel() for t in state_tensors(self.module).values() if not t.is_meta)

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in state_tensors(self.module).values() if not t.is_meta)


__all__ = ["GlobalModel", "read_current"]
