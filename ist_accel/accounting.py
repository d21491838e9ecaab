"""Bytes on the wire: the IST lower bound per round, and what LocalSGD and DDP move.

The lower bound of one round transition r -> r+1, per subnet group (DESIGN.md,
"Communication"). Every averaged tensor element ``e`` has a *location* in each round:
the set of subnets holding it, or, if none holds it, the one group that owns it
(:func:`owner_group`; the owner shards of the global model). Then

* a tensor held whole by every subnet in both rounds (the *shared* set) is all-reduced
  among the S groups: each group sends and receives ``2 (S-1)/S |e|`` (reduce-scatter
  plus all-gather, bandwidth-optimal);
* any other element is sent by each group ``s`` in ``L_r(e)`` unless ``L_{r+1}(e)`` is
  ``{s}`` alone, and received by each ``s`` in ``L_{r+1}(e)`` unless ``L_r(e)`` is ``{s}``
  alone: a unit that one group holds and keeps does not move; otherwise each holder's
  update must leave it once and each next holder must receive it once.

With G ranks per group the cross-group traffic is split evenly: per rank, ``1/G``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decompose import Assignment, Decomposition, Piece

FP32_BYTES = 4


def owner_group(row: torch.Tensor | int, rows: int, num_groups: int) -> torch.Tensor | int:
    """The group owning row ``row`` of a tensor with ``rows`` rows while nobody holds it:
    contiguous row chunks, so each group stores ``~1/S`` of such tensors."""
    return (row * num_groups) // max(rows, 1)


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
    now = _pieces_by_tensor(decomposition, current)
    nxt = _pieces_by_tensor(decomposition, following)
    sent = torch.zeros(S, dtype=torch.float64)
    received = torch.zeros(S, dtype=torch.float64)
    for name, shape in decomposition.global_shapes().items():
        s_, r_ = tensor_bound(shape, now.get(name, {}), nxt.get(name, {}), S)
        sent += s_
        received += r_
    return RoundBytes(tuple(sent.tolist()), tuple(received.tolist()))


def tensor_bound(
    shape: torch.Size, now: dict[int, Piece], following: dict[int, Piece], num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elements of one tensor each group must send and receive in one round transition,
    given the piece each group holds now and next (module docstring)."""
    S, numel = num_groups, shape.numel()
    pieces = (*now.values(), *following.values())
    if len(now) == len(following) == S and all(p.index is None for p in pieces):  # shared
        share = torch.full((S,), 2 * (S - 1) / S * numel, dtype=torch.float64)
        return share, share.clone()
    loc_now = location_bits(now, shape, S)
    loc_next = location_bits(following, shape, S)
    weight = numel if loc_now.numel() == loc_next.numel() == 1 else 1  # both whole-tensor
    sent = torch.zeros(S, dtype=torch.float64)
    received = torch.zeros(S, dtype=torch.float64)
    for s in range(S):
        bit = 1 << s
        sent[s] = weight * ((loc_now & bit != 0) & (loc_next & ~bit != 0)).sum()
        received[s] = weight * ((loc_next & bit != 0) & (loc_now & ~bit != 0)).sum()
    return sent, received


def location_bits(holders: dict[int, Piece], shape: torch.Size, num_groups: int) -> torch.Tensor:
    """Per element, a bit mask of the groups where it lives: its holders, else its owner.
    A tensor held whole gets a one-element mask (broadcast against the other round's)."""
    if holders and all(p.index is None for p in holders.values()):
        return torch.full((1,), sum(1 << s for s in holders), dtype=torch.int64)
    loc = torch.zeros(shape, dtype=torch.int64)
    for s, piece in holders.items():
        loc |= (piece.positions(shape) >= 0).to(torch.int64) << s
    unheld = loc == 0
    if unheld.any():
        rows = torch.arange(shape[0]).view(-1, *([1] * (len(shape) - 1))).expand(shape)
        loc = torch.where(unheld, 1 << owner_group(rows, shape[0], num_groups), loc)
    return loc


def _pieces_by_tensor(decomposition: Decomposition, assignment: Assignment) -> dict[str, dict[int, Piece]]:
    out: dict[str, dict[int, Piece]] = {}
    for s in range(decomposition.num_subnets):
        for piece in decomposition.pieces(assignment, s):
            out.setdefault(piece.global_name, {})[s] = piece
    return out


def ring_allreduce_bytes(numel: int, world_size: int, element_bytes: int = FP32_BYTES) -> float:
    """Bytes one worker sends in a bandwidth-optimal all-reduce: ``2 (N-1)/N`` of the data."""
    return 2 * (world_size - 1) / world_size * numel * element_bytes if world_size > 1 else 0.0
