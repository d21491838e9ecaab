"""Moving subnets between rounds: each element straight from where it lives to where it
is needed next, in one all-to-all among the S group leaders, averaged on arrival.

Knows nothing of model types: it sees *fields* (a global tensor name and shape) and,
per round, the :class:`~ist_accel.decompose.Piece` each group holds of them.

* A field every group holds whole in both rounds (the shared set) is averaged with one
  bucketed all-reduce (bandwidth-optimal: ``2 (S-1)/S`` of its size per rank).
* A field held whole by some groups (ResIST blocks) travels whole from each holder to
  each next holder that is not itself the only holder.
* A field held in index pieces (IST) is planned element by element: an element lives in
  its holders' subnets, or, where nobody holds it, in its owner group's *owner shard*
  (contiguous row chunks, :func:`~ist_accel.accounting.owner_group`). An element moves
  from every place it lives now to every place it will live next, except where both
  are the same single place; the receiver sums what arrives and divides by the number
  of places it lived.

Every rank derives the whole plan from the shared assignments, so message sizes agree
without any handshake. Bytes sent and received are counted per round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .accounting import owner_group
from .decompose import Piece

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class CommStats:
    """Bytes this rank sent/received, by kind, since the counter was last reset."""

    sent: int = 0
    received: int = 0
    allreduce_sent: int = 0
    intra_group: int = 0

    def add(self, other: "CommStats") -> None:
        self.sent += other.sent
        self.received += other.received
        self.allreduce_sent += other.allreduce_sent
        self.intra_group += other.intra_group


@dataclass
class Field:
    """One averaged tensor of the global model: a parameter, a float buffer, or one
    optimizer-state entry of a parameter (``"<param>:<key>"``)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    now: dict[int, Piece] = field(default_factory=dict)  # group -> piece held this round
    next: dict[int, Piece] = field(default_factory=dict)  # group -> piece held next round

    @property
    def whole(self) -> bool:
        return all(p.index is None for p in (*self.now.values(), *self.next.values()))


class OwnerShards:
    """The rows of index-split fields that this group owns while nobody holds them."""

    def __init__(self, group: int, num_groups: int) -> None:
        self.group = group
        self.num_groups = num_groups
        self.rows: dict[str, tuple[int, int]] = {}
        self.values: dict[str, torch.Tensor] = {}

    def row_range(self, shape: torch.Size) -> tuple[int, int]:
        rows = shape[0]
        owners = owner_group(torch.arange(rows), rows, self.num_groups)
        mine = (owners == self.group).nonzero().flatten()
        return (int(mine[0]), int(mine[-1]) + 1) if len(mine) else (0, 0)

    def ensure(self, name: str, shape: torch.Size, dtype: torch.dtype, init: torch.Tensor | None = None) -> None:
        if name in self.values:
            return
        lo, hi = self.row_range(shape)
        self.rows[name] = (lo, hi)
        self.values[name] = (init[lo:hi].clone() if init is not None else torch.zeros((hi - lo, *shape[1:]), dtype=dtype))

    def numel(self) -> int:
        return sum(v.numel() for v in self.values.values())


def _positions(piece: Piece | None, shape: torch.Size) -> torch.Tensor:
    """Global-shaped map: local flat position of each element in ``piece`` (else -1)."""
    pos = torch.full(shape, -1, dtype=torch.int64)
    if piece is None:
        return pos
    if piece.index is None:
        return torch.arange(shape.numel()).view(shape)
    grid = piece._grid(pos)
    pos.index_put_(grid, torch.arange(grid[0].numel()).view(grid[0].shape))
    return pos


def _locations(f: Field, pieces: dict[int, Piece], num_groups: int) -> list[torch.Tensor]:
    """Per group, the global-shaped map of where each element lives there (flat position
    in ``cat(subnet piece, owner rows)``), -1 where it does not live there."""
    locs = [_positions(pieces.get(g), f.shape) for g in range(num_groups)]
    unheld = torch.stack([l < 0 for l in locs]).all(0)
    if unheld.any():
        rows = f.shape[0]
        owner = owner_group(torch.arange(rows), rows, num_groups)
        row_of = torch.arange(rows).view(-1, *([1] * (len(f.shape) - 1))).expand(f.shape)
        for g in range(num_groups):
            mine = (owner == g).nonzero().flatten()
            if not len(mine):
                continue
            lo = int(mine[0])
            held = pieces[g].numel(f.shape) if g in pieces else 0
            flat = torch.arange(f.shape.numel()).view(f.shape) - lo * (f.shape.numel() // rows)
            mask = unheld & (owner[row_of] == g)
            locs[g] = torch.where(mask, held + flat, locs[g])
    return locs


class Exchange:
    """Runs one round transition for one rank of group ``group``.

    With G ranks per group (replicas holding identical values), every replica plans the
    whole transition but moves only its stripe, ``1/G`` of each message, to the replica
    with the same index in the other groups (``stripe_pg``: slow links); an all-gather
    inside the group (``intra_pg``: fast links) completes what arrived.
    """

    def __init__(self, group: int, num_groups: int, *, replica: int = 0, group_size: int = 1,
                 stripe_pg: dist.ProcessGroup | None = None, intra_pg: dist.ProcessGroup | None = None,
                 wire_dtype: str = "fp32") -> None:
        self.group = group
        self.S = num_groups
        self.replica = replica
        self.G = group_size
        self.stripe_pg = stripe_pg
        self.intra_pg = intra_pg
        self.wire = WIRE_DTYPES[wire_dtype]
        self.owners = OwnerShards(group, num_groups)
        self._maps: dict[tuple[str, int], list[torch.Tensor]] = {}

    def run(
        self,
        fields: list[Field],
        read: Callable[[str], torch.Tensor | None],
        write: Callable[[str, torch.Tensor], None],
        round_: int,
    ) -> CommStats:
        """Average every field over its current places (round ``round_``) and deliver it
        to its next ones.

        ``read(name)`` returns this group's current subnet tensor of a field (``None`` if it
        holds none); ``write(name, value)`` stores its next subnet tensor.
        """
        self._round = round_
        self._maps = {k: v for k, v in self._maps.items() if k[1] >= round_}  # this round: cached last sync
        stats = CommStats()
        shared = [f for f in fields if f.whole and len(f.now) == len(f.next) == self.S]
        self._allreduce_shared(shared, read, write, stats)
        sends: list[list[torch.Tensor]] = [[] for _ in range(self.S)]
        recv_plan: list[list[tuple[Field, torch.Tensor | None, int]]] = [[] for _ in range(self.S)]
        finish: list[Callable[[list[torch.Tensor]], None]] = []
        for f in fields:
            if f in shared:
                continue
            if f.whole and all(f.now.values()) and f.now:
                self._plan_whole(f, read, write, sends, recv_plan, finish)
            else:
                self._plan_indexed(f, read, write, sends, recv_plan, finish)
        received = self._all_to_all(sends, [sum(n for _, _, n in plan) for plan in recv_plan], stats)
        for fn in finish:
            fn(received)
        return stats

    # ---- shared: one bucketed all-reduce ------------------------------------

    def _allreduce_shared(self, shared, read, write, stats) -> None:
        if not shared:
            return
        flat = torch.cat([read(f.name).reshape(-1).to(torch.float32) for f in shared])
        if self.S > 1:
            stripe = _stripe(flat, self.G, self.replica).to(self.wire)
            dist.all_reduce(stripe, group=self.stripe_pg)
            stats.allreduce_sent += int(2 * (self.S - 1) / self.S * stripe.numel() * stripe.element_size())
            flat = self._gather_stripes([stripe], [flat.numel()], stats)[0].to(torch.float32)
        flat /= self.S
        offset = 0
        for f in shared:
            n = f.shape.numel()
            write(f.name, flat[offset : offset + n].view(f.shape).to(f.dtype))
            offset += n

    # ---- whole tensors (ResIST blocks) --------------------------------------

    def _plan_whole(self, f, read, write, sends, recv_plan, finish) -> None:
        me, holders, nxt = self.group, sorted(f.now), sorted(f.next)
        mine = read(f.name) if me in f.now else None
        n = f.shape.numel()
        for c in nxt:
            if c != me and mine is not None:
                sends[c].append(mine.reshape(-1))
        if me not in f.next:
            return
        sources = [a for a in holders if a != me]
        slots = []
        for a in sources:
            slots.append((a, sum(k for _, _, k in recv_plan[a])))
            recv_plan[a].append((f, None, n))

        def done(received, f=f, slots=slots, mine=mine, count=len(holders)):
            total = torch.zeros(n, dtype=torch.float32) if mine is None else mine.reshape(-1).to(torch.float32).clone()
            for a, offset in slots:
                total += received[a][offset : offset + n].to(torch.float32)
            write(f.name, (total / count).view(f.shape).to(f.dtype))

        finish.append(done)

    # ---- index pieces (IST), with owner shards ------------------------------

    def _plan_indexed(self, f, read, write, sends, recv_plan, finish) -> None:
        me, S = self.group, self.S
        now, nxt = self.locations(f, now=True), self.locations(f, now=False)
        mine_sub = read(f.name) if me in f.now else None
        if _has_unheld(f.now, f.shape, S) or _has_unheld(f.next, f.shape, S):
            self.owners.ensure(f.name, f.shape, f.dtype)  # optimizer state starts at zero
        store = self.owners.values.get(f.name, torch.zeros(0, dtype=f.dtype))
        local_now = torch.cat([
            mine_sub.reshape(-1).to(torch.float32) if mine_sub is not None else torch.zeros(0),
            store.reshape(-1).to(torch.float32),
        ])
        for c in range(S):
            if c == me:
                continue
            both = (now[me] >= 0) & (nxt[c] >= 0)
            if both.any():
                sends[c].append(local_now[now[me][both]])
        count = torch.stack([(l >= 0) for l in now]).sum(0).to(torch.float32)
        target = nxt[me] >= 0
        if not target.any():
            return
        held_next = f.next[me].numel(f.shape) if me in f.next else 0
        size_next = held_next + store.numel()
        slots = []
        for a in range(S):
            if a == me:
                continue
            both = (now[a] >= 0) & target
            k = int(both.sum())
            if k:
                slots.append((a, sum(m for _, _, m in recv_plan[a]), k, nxt[me][both]))
                recv_plan[a].append((f, None, k))
        own = (now[me] >= 0) & target

        def done(received, f=f, slots=slots, own=own, store=store):
            acc = torch.zeros(size_next, dtype=torch.float64)
            den = torch.zeros(size_next, dtype=torch.float64)
            dest = nxt[me]
            acc.index_put_((dest[own],), local_now[now[me][own]].to(torch.float64), accumulate=True)
            den.index_put_((dest[target],), count[target].to(torch.float64))
            for a, offset, k, positions in slots:
                acc.index_put_((positions,), received[a][offset : offset + k].to(torch.float64), accumulate=True)
            value = torch.where(den > 0, acc / den.clamp_min(1), torch.zeros_like(acc))
            if held_next:
                write(f.name, value[:held_next].view(_piece_shape(f.next[me], f.shape)).to(f.dtype))
            stored = den[held_next:] > 0
            flat_store = store.view(-1)
            flat_store[stored] = value[held_next:][stored].to(store.dtype)

        finish.append(done)

    def locations(self, f: Field, now: bool) -> list[torch.Tensor]:
        """:func:`_locations` of ``f`` this round or next, cached per tensor and round (the
        next round's maps are reused as the current ones at the following sync, and a
        parameter's optimizer-state fields share its maps)."""
        key = (f.name.partition(":")[0], self._round + (0 if now else 1))
        if key not in self._maps:
            self._maps[key] = _locations(f, f.now if now else f.next, self.S)
        return self._maps[key]

    # ---- the one all-to-all ---------------------------------------------------

    def _all_to_all(self, sends: list[list[torch.Tensor]], recv_sizes: list[int], stats: CommStats) -> list[torch.Tensor]:
        """One batch of point-to-point messages, one per (holder, next holder) pair with
        anything to move; with G > 1 each replica moves its stripe of every message.
        (gloo's uneven ``all_to_all_single`` mis-sized messages when many splits were
        empty; direct messages move exactly the same bytes.)"""
        full = [torch.cat(m).to(self.wire) if m else torch.zeros(0, dtype=self.wire) for m in sends]
        recv = [torch.empty(_stripe_size(n, self.G, self.replica), dtype=self.wire) for n in recv_sizes]
        ops = []
        for peer in range(self.S):
            if peer == self.group:
                continue
            rank = peer * self.G + self.replica  # P2P ops take global ranks
            stripe = _stripe(full[peer], self.G, self.replica).contiguous()
            if stripe.numel():
                ops.append(dist.P2POp(dist.isend, stripe, rank))
                stats.sent += stripe.numel() * stripe.element_size()
            if recv[peer].numel():
                ops.append(dist.P2POp(dist.irecv, recv[peer], rank))
                stats.received += recv[peer].numel() * recv[peer].element_size()
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return [t.to(torch.float32) for t in self._gather_stripes(recv, recv_sizes, stats)]

    def _gather_stripes(self, stripes: list[torch.Tensor], sizes: list[int], stats: CommStats) -> list[torch.Tensor]:
        """Rebuild whole messages of ``sizes`` from every replica's stripes (one padded
        all-gather inside the group)."""
        if self.G == 1:
            return stripes
        mine = torch.cat(stripes) if stripes else torch.zeros(0, dtype=self.wire)
        lengths = [sum(_stripe_size(n, self.G, g) for n in sizes) for g in range(self.G)]
        width = max(lengths)
        padded = torch.zeros(width, dtype=mine.dtype)
        padded[: mine.numel()] = mine
        gathered = [torch.empty_like(padded) for _ in range(self.G)]
        dist.all_gather(gathered, padded, group=self.intra_pg)
        stats.intra_group += (self.G - 1) * width * padded.element_size()
        offsets = [0] * self.G
        out = []
        for n in sizes:
            parts = []
            for g in range(self.G):
                k = _stripe_size(n, self.G, g)
                parts.append(gathered[g][offsets[g] : offsets[g] + k])
                offsets[g] += k
            out.append(torch.cat(parts))
        return out


def _stripe_size(n: int, parts: int, i: int) -> int:
    return n // parts + (i < n % parts)


def _stripe(t: torch.Tensor, parts: int, i: int) -> torch.Tensor:
    """Part ``i`` of ``parts`` near-equal contiguous parts of a flat tensor."""
    start = sum(_stripe_size(t.numel(), parts, j) for j in range(i))
    return t[start : start + _stripe_size(t.numel(), parts, i)]


def _has_unheld(pieces: dict[int, Piece], shape: torch.Size, num_groups: int) -> bool:
    return bool(torch.stack([_positions(pieces.get(g), shape) < 0 for g in range(num_groups)]).all(0).any())


def _piece_shape(piece: Piece, shape: torch.Size) -> tuple[int, ...]:
    if piece.index is None:
        return tuple(shape)
    return tuple(
        size if (dim >= len(piece.index) or piece.index[dim] is None) else len(piece.index[dim])
        for dim, size in enumerate(shape)
    )
