"""The engine's only door to ``torch.distributed``: the few collectives and point-to-point
messages IST needs, each counted in a byte ledger by purpose (``shared`` and ``exchange``: the round end, ``check``,
``setup``, ``gather``, ``eval``, ``intra``), so reports can give the exchange and every
other byte separately. It also owns the translation of a failed collective into
:class:`~ist_accel.faults.ISTSyncError` (:meth:`Transport.communication`) and the one
flatten -> collective -> unflatten of a set of tensors (:meth:`Transport.average`,
:meth:`Transport.broadcast_values`).

Bytes are what this rank puts on (and takes off) the wire under the algorithm each
collective runs: point-to-point messages exactly; an all-reduce of ``n`` bytes among
``N`` ranks ``2 (N-1)/N n`` each way (ring: reduce-scatter + all-gather); an all-gather
``(N-1)`` chunks; a broadcast the payload once per receiving rank, sent by the root.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .faults import ISTError, is_communication_error, peer_failures, sync_failure
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

    def copy(self) -> dict[str, tuple[float, float]]:
        return {k: (b.sent, b.received) for k, b in self.items()}


def _size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


class Transport:
    """Collectives over a :class:`Topology`'s groups, with a byte ledger. It also owns the
    translation of communication failures (:meth:`communication`): the algorithm's units
    never catch them themselves."""

    def __init__(self, topology: Topology, sync_timeout: float | None = None) -> None:
        self.topology = topology
        self.sync_timeout = sync_timeout  # named in the error of a failed collective (None: as applied)
        self.ledger = Ledger()

    @contextlib.contextmanager
    def communication(self, what: str) -> Iterator[None]:
        """A failing collective inside becomes :class:`~ist_accel.faults.ISTSyncError` naming
        ``what`` and what a failed peer said; the engine's own errors pass unchanged."""
        try:
            yield
        except ISTError:
            raise
        except Exception as error:
            if not is_communication_error(error):
                raise
            raise sync_failure(error, self.sync_timeout, what, peer_failures()) from error

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

    def average(self, tensors: Sequence[torch.Tensor], kind: str, group: dist.ProcessGroup | None = None,
                dtype: torch.dtype | None = None, in_place: bool = True) -> list[torch.Tensor]:
        """The mean of ``tensors`` over ``group``, in one all-reduce of their flat
        concatenation (in ``dtype``, default: the tensors' own). In place: written back into
        ``tensors``; else returned as new tensors of their shapes and dtypes."""
        if not tensors:
            return []
        flat = torch.cat([t.reshape(-1) for t in tensors])
        if dtype is not None:
            flat = flat.to(dtype)
        self.all_reduce(flat, kind, group=group)
        flat /= _size(group)
        return unflatten(flat, tensors, in_place)

    def broadcast_values(self, tensors: Sequence[torch.Tensor], src: int, kind: str, dtype: torch.dtype) -> None:
        """Give every rank rank ``src``'s values of ``tensors`` (in place), in one broadcast
        of their flat concatenation in ``dtype``."""
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
        self.broadcast(flat, src, kind)
        with torch.no_grad():
            unflatten(flat, tensors, in_place=True)

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


def unflatten(flat: torch.Tensor, tensors: Sequence[torch.Tensor], in_place: bool) -> list[torch.Tensor]:
    """Split ``flat`` back into ``tensors``' shapes: copied into them (``in_place``), or as
    views of ``flat`` in each tensor's dtype."""
    out, offset = [], 0
    for t in tensors:
        part = flat[offset : offset + t.numel()].view_as(t)
        out.append(t.copy_(part) if in_place else part.to(t.dtype))
        offset += t.numel()
    return out


__all__ = ["KINDS", "Bytes", "Ledger", "Transport", "unflatten"]
