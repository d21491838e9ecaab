"""A rank's state of the round's outer optimizer (:mod:`ist_accel.outer`, DiLoCo's outer
step over IST's units): each trained parameter's value at the round's start (``before``)
and its outer momentum, which travels with its unit as one more field
(``<name>:outer_momentum``). At a sync the group's values are turned, in place, into their
outer-step contributions, whose plain average over holders is the outer step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .outer import MOMENTUM_KEY, OuterSGD
from .subnet import SubnetTensors

State = dict[str, dict[str, Any]]


class OuterState:
    """``before`` and the outer momentum of this rank's subnet parameters (module docstring)."""

    def __init__(self, outer: OuterSGD, subnet: nn.Module, device: torch.device) -> None:
        self.outer, self.subnet = outer, subnet
        self.momentum: dict[str, torch.Tensor] = {}  # per subnet parameter; travels with its unit
        if outer.has_momentum:
            self.momentum = {n: torch.zeros_like(p, device=device) for n, p in subnet.named_parameters()}
        self.before: dict[str, torch.Tensor] = {}

    @property
    def is_plain_average(self) -> bool:
        return self.outer.is_plain_average

    def take_before(self, tensors: SubnetTensors) -> None:
        """Keep the round's starting values of the parameters (none, and nothing read,
        under plain averaging)."""
        self.before = {}
        if not self.outer.is_plain_average:
            values = tensors.tensors()
            self.before = {n: values[n].detach().clone() for n, _ in self.subnet.named_parameters()}

    def with_momentum(self, state: State) -> State:
        """``state`` (the optimizer's, by parameter) with each parameter's outer momentum
        added as a new entry; the optimizer's own entries stay as they are."""
        for name, momentum in self.momentum.items():
            state[name] = {**state.get(name, {}), MOMENTUM_KEY: momentum}
        return state

    @staticmethod
    def without_momentum(state: State) -> State:
        """``state`` without the outer momentum: the optimizer's own."""
        inner = {n: {k: v for k, v in st.items() if k != MOMENTUM_KEY} for n, st in state.items()}
        return {n: st for n, st in inner.items() if st}

    def contribute(self, values: dict[str, torch.Tensor]) -> None:
        """At a sync, in place: this group's values and outer momentum become their outer-step
        contributions (nothing under plain averaging)."""
        if not self.outer.is_plain_average:
            self._turn_into_contributions(values, self.momentum)

    def contributions_of(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of this group's parameters turned into their outer-step contributions (a read
        of the global model mid-round sees the model a sync now would produce)."""
        copies = {n: values[n].detach().clone() for n in self.before}
        self._turn_into_contributions(copies, momentum=None)
        return copies

    def _turn_into_contributions(self, values: dict[str, torch.Tensor],
                                 momentum: dict[str, torch.Tensor] | None) -> None:
        """In place: each trained parameter in ``values`` becomes its outer-step contribution;
        given ``momentum``, each one's outer-momentum contribution is written into it."""
        params = dict(self.subnet.named_parameters())
        for name, before in self.before.items():
            if params[name].requires_grad:  # a frozen unit keeps its value
                w = self.outer.contribute(values[name], before, self.momentum.get(name))
                if w is not None and momentum is not None:
                    momentum[name].copy_(w)

    def state_dict(self) -> dict[str, Any]:
        return {"outer_momentum": {n: m.clone() for n, m in self.momentum.items()},
                "outer_before": {n: b.clone() for n, b in self.before.items()}}

    def load_momentum(self, state: dict[str, Any]) -> None:
        """The outer momentum of :meth:`state_dict` (before the round's snapshot is taken)."""
        if self.momentum and set(state.get("outer_momentum", {})) != set(self.momentum):
            raise ValueError("checkpoint holds no outer momentum for this subnet (written without outer_momentum?)")
        for name, value in state.get("outer_momentum", {}).items():
            self.momentum[name].copy_(value)

    def load_before(self, state: dict[str, Any]) -> None:
        """The round's ``before`` of :meth:`state_dict` (a checkpoint inside a round)."""
        for name, value in state.get("outer_before", {}).items():
            if name in self.before:
                self.before[name].copy_(value)


__all__ = ["OuterState"]
