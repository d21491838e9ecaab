"""A single-process reference of IST rounds: the ground truth for distributed runs.

One round (IST Alg. 1 of arXiv 1910.02120; ResIST Alg. 1 of arXiv 2107.00961):
sample the assignment, refill every subnet from the global model, train the S
subnets one after another on their own batches, then average every parameter,
floating-point buffer (BatchNorm statistics) and, under ``carry``, optimizer state
over the subnets that held it (under ``local`` a subnet keeps its own state for every
tensor it holds again). With an outer optimizer (:mod:`ist_accel.outer`), the
parameters then take one step of ``torch.optim.SGD`` over their pseudo-gradient
``before - average``, on the elements some subnet held (DiLoCo, arXiv 2311.08105). A subnet trained by a group of G ranks is simulated as
G replicas whose gradients are averaged each step and whose buffers are averaged at
the end of the round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .config import OPTIMIZER_STATE_POLICIES
from .decompositions import Decomposition, average_into_global, keep_frozen, kept_tensors, load_subnet
from .outer import OuterSGD
from .reference_wire import ReferenceWire
from .subnet import keep_optimizer_state
from .tensors import Piece, state_tensors
from .wire_codec import WireCodec

LossFn = Callable[[nn.Module, Any], torch.Tensor]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class ReferenceIST:
    """Runs IST rounds on one process, subnet after subnet.

    Args:
        decomposition: how the global model (``decomposition.model``) is split.
        optimizer_factory: builds an optimizer over a subnet's parameters; built once
            per subnet (subnets have fixed shapes) and refilled every round.
        optimizer_state: ``"reset"`` clears the state each round (the papers);
            ``"carry"`` keeps a global copy, averaged over holders like parameters;
            ``"local"`` lets each subnet keep the state of a tensor it holds again next
            round (same global tensor and index), the rest fresh.
        outer: the outer optimizer (``ISTConfig.outer()``); None or plain averaging: none.
        wire: a quantized wire's codec (:mod:`ist_accel.reference_wire`); None: values
            travel exactly.
    """

    def __init__(
        self,
        decomposition: Decomposition,
        optimizer_factory: OptimizerFactory,
        optimizer_state: str = "reset",
        outer: OuterSGD | None = None,
        wire: WireCodec | None = None,
    ) -> None:
        if optimizer_state not in OPTIMIZER_STATE_POLICIES:
            raise ValueError(f"optimizer_state must be one of {', '.join(OPTIMIZER_STATE_POLICIES)}, "
                             f"got {optimizer_state!r}")
        self.decomposition = decomposition
        self.optimizer_state = optimizer_state
        self.subnets = [decomposition.build_subnet(s) for s in range(decomposition.num_subnets)]
        self.optimizers = [optimizer_factory(list(m.parameters())) for m in self.subnets]
        self.global_tensors = state_tensors(decomposition.model)
        self.global_optimizer_state: dict[str, dict[str, torch.Tensor]] = {}
        self.held: list[list[Piece]] = [[] for _ in self.subnets]  # last round's pieces per subnet (``local``)
        self.frozen = {n for n, p in decomposition.model.named_parameters() if not p.requires_grad}
        self.round = 0
        self.outer = None if outer is None or outer.is_plain_average else outer
        if wire is not None and self.outer is not None:
            raise ValueError("the reference models a quantized wire with plain averaging only (outer_lr=1, no momentum)")
        self.wire = None if wire is None else ReferenceWire(wire, decomposition.num_subnets)
        if self.outer is not None:  # the global parameters' outer SGD, on copies it steps from `before`
            trained = [n for n, _ in decomposition.model.named_parameters() if n not in self.frozen]
            self.outer_params = {n: torch.zeros_like(self.global_tensors[n], requires_grad=True) for n in trained}
            self.outer_optimizer = torch.optim.SGD(list(self.outer_params.values()), lr=self.outer.lr,
                                                   momentum=self.outer.momentum, nesterov=self.outer.nesterov)

    def run_round(self, batches: Sequence[Sequence[Sequence[Any]]], loss_fn: LossFn) -> None:
        """One round. ``batches[s][g][t]`` is step ``t`` of replica ``g`` of subnet ``s``."""
        d = self.decomposition
        if len(batches) != d.num_subnets:
            raise ValueError(f"need batches for {d.num_subnets} subnets, got {len(batches)}")
        assignment = d.assignment(self.round)
        before = {n: self.global_tensors[n].detach().clone() for n in self.outer_params} if self.outer else {}
        contributions, state_contributions = [], []
        for s, (subnet, optimizer) in enumerate(zip(self.subnets, self.optimizers)):
            pieces = d.pieces(assignment, s)
            load_subnet(subnet, self.global_tensors, pieces)
            keep_frozen(subnet, self.frozen, pieces)
            if self.optimizer_state == "local":
                keep_optimizer_state(optimizer, subnet, kept_tensors(self.held[s], pieces))
            else:
                optimizer.state.clear()
            self.held[s] = pieces
            if self.optimizer_state == "carry":
                load_optimizer_state(optimizer, subnet, self.global_optimizer_state, pieces)
            train_group(subnet, optimizer, batches[s], loss_fn)
            contributions.append((pieces, state_tensors(subnet)))
            state_contributions.append((pieces, optimizer_state_by_name(optimizer, subnet)))
        held = average_into_global(self.global_tensors, contributions)
        if self.optimizer_state == "carry":
            average_optimizer_state(self.global_optimizer_state, self.global_tensors, state_contributions)
        if self.outer is not None:
            self._outer_step(before, held)
        if self.wire is not None:
            self._through_the_wire(contributions, state_contributions)
        self.round += 1

    def _through_the_wire(self, contributions, state_contributions) -> None:
        """The averaged values as the quantized wire delivers them to round r+1's places."""
        d = self.decomposition
        following = d.assignment(self.round + 1)
        parameters = {n for n, _ in d.model.named_parameters()}
        fields = [(n, n, "frozen" if n in self.frozen else "coded" if n in parameters else "exact")
                  for n in self.global_tensors]
        tensors = dict(self.global_tensors)
        by_field: dict[str, dict[int, torch.Tensor]] = {}
        for s, (pieces, values) in enumerate(contributions):
            for piece in pieces:
                by_field.setdefault(piece.global_name, {})[s] = values[piece.subnet_name]
        if self.optimizer_state == "carry":
            for name, entries in self.global_optimizer_state.items():
                for key, value in entries.items():
                    fields.append((f"{name}:{key}", name, "exact" if value.dim() == 0 else "coded"))
                    tensors[f"{name}:{key}"] = value
            for s, (pieces, state) in enumerate(state_contributions):
                for piece in pieces:
                    for key, value in state.get(piece.subnet_name, {}).items():
                        by_field.setdefault(f"{piece.global_name}:{key}", {})[s] = value
        now = [d.pieces(d.assignment(self.round), s) for s in range(d.num_subnets)]
        nxt = [d.pieces(following, s) for s in range(d.num_subnets)]
        total = sum(t.numel() for t in tensors.values())
        with torch.no_grad():
            self.wire.apply(self.round, fields, tensors, now, nxt, by_field, total)

    def _outer_step(self, before: dict[str, torch.Tensor], held: dict[str, torch.Tensor]) -> None:
        """x <- before - outer step(before - average) where held; elsewhere value and momentum stay."""
        kept = {}
        with torch.no_grad():
            for name, p in self.outer_params.items():
                mask = held.get(name, torch.zeros(p.shape, dtype=torch.bool))
                p.copy_(before[name])
                p.grad = torch.where(mask, before[name] - self.global_tensors[name], torch.zeros_like(p))
                buffer = self.outer_optimizer.state.get(p, {}).get("momentum_buffer")
                kept[name] = (mask, None if buffer is None else buffer.clone())
        self.outer_optimizer.step()
        with torch.no_grad():
            for name, p in self.outer_params.items():
                mask, buffer = kept[name]
                self.global_tensors[name].copy_(torch.where(mask, p, before[name]))
                if buffer is not None:  # torch's first step sets the buffer to the gradient: 0 where unheld
                    state = self.outer_optimizer.state[p]["momentum_buffer"]
                    state.copy_(torch.where(mask, state, buffer))


def train_group(
    subnet: nn.Module, optimizer: torch.optim.Optimizer, replica_batches: Sequence[Sequence[Any]], loss_fn: LossFn
) -> None:
    """Local steps of one subnet trained by ``G = len(replica_batches)`` data-parallel
    replicas: gradients averaged every step, float buffers averaged at the end."""
    G = len(replica_batches)
    steps = len(replica_batches[0])
    buffers = {n: b for n, b in subnet.named_buffers() if b.is_floating_point()}
    replica_buffers = [{n: b.clone() for n, b in buffers.items()} for _ in range(G)]
    subnet.train()
    for t in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for g in range(G):
            _swap_buffers(buffers, replica_buffers[g])
            loss = loss_fn(subnet, replica_batches[g][t])
            (loss / G).backward()
            replica_buffers[g] = {n: b.clone() for n, b in buffers.items()}
        optimizer.step()
    with torch.no_grad():
        for n, b in buffers.items():
            b.copy_(torch.stack([r[n] for r in replica_buffers]).to(torch.float64).mean(0).to(b.dtype))


def _swap_buffers(buffers: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, b in buffers.items():
            b.copy_(values[n])


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``optimizer.state`` keyed by parameter name (tensor-valued entries only)."""
    names = {p: n for n, p in module.named_parameters()}
    return {
        names[p]: {k: v for k, v in st.items() if isinstance(v, torch.Tensor)}
        for p, st in optimizer.state.items()
        if p in names
    }


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    module: nn.Module,
    global_state: dict[str, dict[str, torch.Tensor]],
    pieces: list[Piece],
) -> None:
    """``carry``: give each subnet parameter the global optimizer state of its unit."""
    params = dict(module.named_parameters())
    for piece in pieces:
        p = params.get(piece.subnet_name)
        if p is None or piece.global_name not in global_state:
            continue
        optimizer.state[p] = {
            k: piece.gather(v) if v.dim() > 0 else v.clone()
            for k, v in global_state[piece.global_name].items()
        }


def average_optimizer_state(
    global_state: dict[str, dict[str, torch.Tensor]],
    global_tensors: dict[str, torch.Tensor],
    contributions: list[tuple[list[Piece], dict[str, dict[str, torch.Tensor]]]],
) -> None:
    """Average optimizer state over holders, like parameters. Per-element state (momentum,
    Adam moments) is averaged element-wise; scalars (Adam's step) over holders of the
    tensor. Elements never trained keep zeros, which SGD and Adam treat as fresh state."""
    keys = {k for _, st in contributions for per in st.values() for k in per}
    for key in keys:
        targets: dict[str, torch.Tensor] = {}
        per_key = []
        for pieces, state in contributions:
            local, mapped = {}, []
            for piece in pieces:
                value = state.get(piece.subnet_name, {}).get(key)
                if value is None:
                    continue
                g = global_tensors[piece.global_name]
                scalar = value.dim() == 0
                if piece.global_name not in global_state or key not in global_state[piece.global_name]:
                    shape = value.shape if scalar else g.shape
                    global_state.setdefault(piece.global_name, {})[key] = torch.zeros(shape, dtype=value.dtype)
                targets[piece.global_name] = global_state[piece.global_name][key]
                local[piece.subnet_name] = value
                mapped.append(Piece(piece.subnet_name, piece.global_name, None) if scalar else piece)
            per_key.append((mapped, local))
        average_into_global(targets, per_key)
