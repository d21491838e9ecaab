"""Bytes on the wire: the IST lower bound per round, and what LocalSGD and DDP move.

The lower bound of one round transition r -> r+1, per subnet group (DESIGN.md,
"Communication"). Every averaged tensor element ``e`` has a *location* in each round:
the set of subnets holding it, or, if none holds it, the one group that owns it
(:func:`~ist_accel.transfer.owner_group`; the owner shards of the global model). Then

* a tensor held whole by every subnet in both rounds (the *shared* set) is all-reduced
  among the S groups: each group sends and receives ``2 (S-1)/S |e|`` (reduce-scatter
  plus all-gather, bandwidth-optimal);
* any other element is sent by each group ``s`` in ``L_r(e)`` unless ``L_{r+1}(e)`` is
  ``{s}`` alone, and received by each ``s`` in ``L_{r+1}(e)`` unless ``L_r(e)`` is ``{s}``
  alone: a unit that one group holds and keeps does not move; otherwise each holder's
  update must leave it once and each next holder must receive it once;
* a frozen tensor (``requires_grad=False``) never changes: shared, it costs nothing;
  otherwise each next holder that lacks it receives it once, from one holder.

With G ranks per group the cross-group traffic is split evenly: per rank, ``1/G``.
Counted per (row class x column class) cell of each tensor (:mod:`ist_accel.transfer`),
never per element.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decompositions import Assignment, Decomposition
from .tensors import state_tensors
from .transfer import FieldSpec, field_bound, layouts, owner_group

FP32_BYTES = 4


@dataclass(frozen=True)
class RoundBytes:
    """Elements (not bytes) each group must send/receive in one round transition."""

    sent: tuple[float, ...]
    received: tuple[float, ...]

    def bytes(self, element_bytes: int = FP32_BYTES, group_size: int = 1) -> "RoundBytes":
        scale = element_bytes / group_size
        return RoundBytes(tuple(x * scale for x in self.sent), tuple(x * scale for x in self.received))


def lower_bound(decomposition: Decomposition, current: Assignment, following: Assignment) -> RoundBytes:
    """Elements each subnet group must send and receive between ``current`` and
    ``following`` (see the module docstring for the definition)."""
    S = decomposition.num_subnets
    model = decomposition.model
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    fields = [FieldSpec(n, t.shape, t.dtype, frozen=n in frozen) for n, t in state_tensors(model).items()]
    now = layouts(fields, [decomposition.pieces(current, s) for s in range(S)])
    nxt = layouts(fields, [decomposition.pieces(following, s) for s in range(S)])
    sent = torch.zeros(S, dtype=torch.float64)
    received = torch.zeros(S, dtype=torch.float64)
    for f in fields:
        s_, r_ = field_bound(f, now[f.name], nxt[f.name], S)
        sent += torch.tensor(s_, dtype=torch.float64)
        received += torch.tensor(r_, dtype=torch.float64)
    return RoundBytes(tuple(sent.tolist()), tuple(received.tolist()))


def ring_allreduce_bytes(numel: int, world_size: int, element_bytes: int = FP32_BYTES) -> float:
    """Bytes one worker sends in a bandwidth-optimal all-reduce: ``2 (N-1)/N`` of the data."""
    return 2 * (world_size - 1) / world_size * numel * element_bytes if world_size > 1 else 0.0


__all__ = ["FP32_BYTES", "RoundBytes", "lower_bound", "owner_group", "ring_allreduce_bytes"]
