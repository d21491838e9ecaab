"""The engine's only door to ``torch.distributed``: the few collectives and point-to-point
messages IST needs, each counted in a byte ledger by purpose (``shared`` and ``exchange``: the round end, ``check``,
``setup``, ``gather``, ``eval``, ``intra``), so reports can give the exchange and every
other byte separately.

Bytes are what this rank puts on (and takes off) the wire under the algorithm each
collective runs: point-to-point messages exactly; an all-reduce of ``n`` bytes among
``N`` ranks ``2 (N-1)/N n`` each way (ring: reduce-scatter + all-gather); an all-gather
``(N-1)`` chunks; a broadcast the payload once per receiving rank, sent by the root.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .topology import Topology

KINDS = ("shared", "exchange", "check", "setup", "gather", "eval", "intra")


@dataclass
class Bytes:
    sent: float = 0.0
    received: float = 0.0


class Ledger(defaultdict):
    """kind -> :class:`Bytes` (cumulative)."""

    def __init__(self) -> None:
        super().__init__(Bytes)

    def total(self, kinds: tuple[str, ...] | None = None) -> Bytes:
        out = Bytes()
        for kind, b in self.items():
            if kinds is None or kind in kinds:
                out.sent += b.sent
                out.received += b.received
        return out

    def copy(self) -> dict[str, tuple[float, float]]:
        return {k: (b.sent, b.received) for k, b in self.items()}


def _size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


class Transport:
    """Collectives over a :class:`Topology`'s groups, with a byte ledger."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.ledger = Ledger()

    def _count(self, kind: str, sent: float, received: float) -> None:
        entry = self.ledger[kind]
        entry.sent += sent
        entry.received += received

    def all_reduce(self, tensor: torch.Tensor, kind: str, group: dist.ProcessGroup | None = None,
                   op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
        """In place, over ``group`` (None: the default group)."""
        n = _size(group)
        if n > 1:
            dist.all_reduce(tensor, op=op, group=group)
        ring = 2 * (n - 1) / n * tensor.numel() * tensor.element_size() if n > 1 else 0.0
        self._count(kind, ring, ring)

    def reduce(self, tensor: torch.Tensor, dst: int, kind: str, group: dist.ProcessGroup | None = None) -> None:
        """Sum ``tensor`` into global rank ``dst`` (in place there)."""
        n = _size(group)
        if n > 1:
            dist.reduce(tensor, dst, group=group)
        payload = tensor.numel() * tensor.element_size()
        root = dist.get_rank() == dst
        self._count(kind, 0.0 if root else payload, payload * (n - 1) if root else 0.0)

    def all_gather(self, out: list[torch.Tensor], tensor: torch.Tensor, kind: str,
                   group: dist.ProcessGroup | None = None) -> None:
        n = _size(group)
        dist.all_gather(out, tensor, group=group)
        chunk = (n - 1) * tensor.numel() * tensor.element_size()
        self._count(kind, chunk, chunk)

    def broadcast(self, tensor: torch.Tensor, src: int, kind: str, group: dist.ProcessGroup | None = None) -> None:
        n = _size(group)
        if n > 1:
            dist.broadcast(tensor, src, group=group)
        payload = tensor.numel() * tensor.element_size()
        root = dist.get_rank() == src
        self._count(kind, payload * (n - 1) if root else 0.0, 0.0 if root else payload)

    def exchange_small(self, tensor: torch.Tensor, kind: str) -> torch.Tensor:
        """Every rank's ``tensor`` (small, same shape everywhere), stacked by rank. Sent
        point to point to every other rank: on few ranks that is one message latency,
        where a small all-reduce chains 2 (N-1) of them."""
        out, works = self.start_small(tensor, kind)
        for work in works:
            work.wait()
        return out

    def start_small(self, tensor: torch.Tensor, kind: str) -> tuple[torch.Tensor, list]:
        """:meth:`exchange_small` posted: the output (complete once the works have waited)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        out = torch.empty((world, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        out[rank].copy_(tensor)
        works = self.start({r: tensor for r in range(world) if r != rank},
                           {r: out[r] for r in range(world) if r != rank}, kind) if world > 1 else []
        return out, works

    def start(self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], kind: str) -> list:
        """Post a batch of messages (as :meth:`point_to_point`) and return their works."""
        ops = []  # the receives first: on shaped links gloo then moved 73 % of the rate, not 53 % (linkprobe.py)
        for rank, t in recvs.items():
            if t.numel():
                ops.append(dist.P2POp(dist.irecv, t, rank))
                self._count(kind, 0.0, t.numel() * t.element_size())
        for rank, t in sends.items():
            if t.numel():
                ops.append(dist.P2POp(dist.isend, t, rank))
                self._count(kind, t.numel() * t.element_size(), 0.0)
        return dist.batch_isend_irecv(ops) if ops else []

    def point_to_point(self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], kind: str) -> None:
        """One batch of messages: ``sends[rank]`` to global ``rank``, ``recvs[rank]`` filled
        from it; empty tensors are skipped. Returns when all have completed."""
        for work in self.start(sends, recvs, kind):
            work.wait()


__all__ = ["KINDS", "Bytes", "Ledger", "Transport"]
