"""Where a rank's subnet values live, read and written whole by subnet tensor name.

By default the subnet module and its torch optimizer (:class:`SubnetTensors`: the
tensors handed out *are* the live storage, so a round end writes into them in place).
A DeepSpeed engine that partitions them inside the group has its own
(:class:`ist_accel.zero.ZeroSubnet`: copies assembled from the partitions, written back
with :meth:`write`).

Copies of optimizer state (:func:`clone_state`) and the integer buffers no round averages
(:func:`integer_buffers`) are made here too, for every unit of the engine.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .tensors import TensorSlots, state_tensors


class SubnetTensors:
    """The subnet module and its optimizer (module docstring)."""

    live = True  # tensors() and optimizer_state() return the storage itself

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer
        self._slots = TensorSlots(module)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and float buffers (looked up each time: ``module.to()`` may replace buffers)."""
        return self._slots.tensors()

    def rebind(self, views: dict[str, torch.Tensor]) -> None:
        """Make each named subnet tensor use the storage of its ``views`` entry (same shape,
        values already copied in): a parameter stays the same object with new ``data``, a
        buffer is replaced."""
        for name, store, attr in self._slots.slots:
            if name in views:
                if isinstance(store[attr], nn.Parameter):
                    store[attr].data = views[name]
                else:
                    store[attr] = views[name]

    def optimizer_state(self, ensure: tuple[tuple[str, bool], ...] = ()) -> dict[str, dict[str, Any]]:
        """Per-parameter optimizer state by parameter name; entries of ``ensure`` ((key,
        scalar) pairs) that a trained parameter lacks are created as zeros (a fresh state
        for SGD and Adam)."""
        names = {p: n for n, p in self.module.named_parameters()}
        for p in names:
            if p.requires_grad and ensure:
                entry = self.optimizer.state[p]
                for key, scalar in ensure:
                    if key not in entry:
                        entry[key] = torch.zeros((), dtype=torch.float32, device=p.device) if scalar else \
                            torch.zeros_like(p, memory_format=torch.preserve_format)
        return {names[p]: st for p, st in self.optimizer.state.items() if p in names and st}

    def write(self, tensors: dict[str, torch.Tensor], state: dict[str, dict[str, Any]] | None = None) -> None:
        """Copy ``tensors`` in; a given ``state`` replaces the optimizer state."""
        local = state_tensors(self.module)
        with torch.no_grad():
            for name, value in tensors.items():
                if local[name] is not value and local[name].data_ptr() != value.data_ptr():
                    local[name].copy_(value)
        if state is not None:
            params = dict(self.module.named_parameters())
            self.optimizer.state.clear()
            for name, entries in clone_state(state).items():
                self.optimizer.state[params[name]] = entries

    def reset_optimizer_state(self) -> None:
        """A fresh optimizer state (policy ``reset``)."""
        self.optimizer.state.clear()

    def keep_optimizer_state(self, kept: dict[str, str]) -> None:
        """Policy ``local`` (:func:`keep_optimizer_state`)."""
        keep_optimizer_state(self.optimizer, self.module, kept)

    def state_dict(self) -> dict[str, Any]:
        """The subnet and its optimizer state, for a checkpoint of this rank."""
        return {"subnet": {n: t.detach().clone() for n, t in self.tensors().items()},
                "optimizer": clone_state(self.optimizer_state())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "optimizer" not in state:
            raise ValueError("this IST checkpoint was written under DeepSpeed: resume it under the same DeepSpeed setup")
        self.write(state["subnet"], state["optimizer"])

    def resident_elements(self) -> int:
        """Elements of parameters, gradients, buffers and optimizer state held here."""
        n = sum(t.numel() for t in state_tensors(self.module).values())
        n += sum(p.grad.numel() for p in self.module.parameters() if p.grad is not None)
        return n + sum(v.numel() for st in self.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))

    def resident_bytes(self) -> int:
        """Bytes of the same."""
        n = sum(t.numel() * t.element_size() for t in state_tensors(self.module).values())
        n += sum(p.grad.numel() * p.grad.element_size() for p in self.module.parameters() if p.grad is not None)
        return n + sum(v.numel() * v.element_size() for st in self.optimizer.state.values() for v in st.values()
                       if isinstance(v, torch.Tensor))


def keep_optimizer_state(optimizer: torch.optim.Optimizer, module: nn.Module, kept: dict[str, str]) -> None:
    """Policy ``local``: parameter ``new`` of ``module`` takes the state parameter
    ``kept[new]`` had (:func:`~ist_accel.decompositions.kept_tensors`); every other
    parameter starts fresh."""
    params = dict(module.named_parameters())
    before = {n: optimizer.state[p] for n, p in params.items() if p in optimizer.state}
    optimizer.state.clear()
    for new, old in kept.items():
        if new in params and old in before:
            optimizer.state[params[new]] = before[old]


def clone_state(state: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A copy of per-parameter optimizer state: its tensors cloned, other entries shared."""
    return {n: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()} for n, st in state.items()}


def integer_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers no round averages (BatchNorm's ``num_batches_tracked``): the complement
    of :func:`~ist_accel.tensors.state_tensors`; each subnet and the global model keep their own."""
    return {n: b for n, b in module.named_buffers() if not b.is_floating_point()}


def integer_buffer_copies(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of :func:`integer_buffers` as ``module`` holds them (zeros for a meta-device one)."""
    return {n: torch.zeros(b.shape, dtype=b.dtype) if b.is_meta else b.detach().clone()
            for n, b in integer_buffers(module).items()}


__all__ = ["SubnetTensors", "clone_state", "integer_buffer_copies", "integer_buffers", "keep_optimizer_state"]
