"""Moving subnets between rounds: each element straight from where it lives to where it
is needed next, in one all-to-all among the S group leaders, averaged on arrival.

Knows nothing of model types: it sees *fields* (a global tensor name and shape) and,
per round, the :class:`~ist_accel.decompose.Piece` each group holds of them.

* A field every group holds whole in both rounds (the shared set) is averaged in one
  bucket by reduce-scatter + all-gather (``2 (S-1)/S`` of its size per rank).
* A field held whole by some groups (ResIST blocks) travels whole from each holder to
  each next holder that is not itself the only holder.
* A field held in disjoint index pieces (IST) is planned element by element: an element
  lives in its holder's subnet, or, where nobody holds it, in its owner group's *owner
  shard* (contiguous row chunks, :func:`~ist_accel.accounting.owner_group`). It moves
  from where it lives now to where it will live next, unless that is the same place.

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

# newer torch names them *_single (the *_tensor names warn there); older releases have only *_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

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

    def __init__(self, group: int, num_groups: int, device: torch.device | str = "cpu") -> None:
        self.group = group
        self.device = torch.device(device)
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
        self.values[name] = (init[lo:hi].clone() if init is not None else torch.zeros((hi - lo, *shape[1:]), dtype=dtype, device=self.device))

    def numel(self) -> int:
        return sum(v.numel() for v in self.values.values())


def _positions(piece: Piece | None, shape: torch.Size) -> torch.Tensor:
    """Global-shaped map: local flat position of each element in ``piece`` (else -1)."""
    return torch.full(shape, -1, dtype=torch.int64) if piece is None else piece.positions(shape)


def _locations(f: Field, pieces: dict[int, Piece], num_groups: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per element (flat), the group it lives in this round (its holder, else its owner)
    and its position there in ``cat(subnet piece, owner rows)``; and whether any element
    is unheld. Index pieces of one round are disjoint (IST); overlap is refused."""
    shape, numel = f.shape, f.shape.numel()
    group = torch.full((numel,), -1, dtype=torch.int64)
    position = torch.full((numel,), -1, dtype=torch.int64)
    flat = torch.arange(numel)
    for g, piece in sorted(pieces.items()):
        local = piece.positions(shape).reshape(-1)
        held = local >= 0
        if (held & (group >= 0)).any():
            raise ValueError(f"index pieces of {f.name!r} overlap; the exchange needs disjoint index pieces")
        group = torch.where(held, g, group)
        position = torch.where(held, local, position)
    unheld = group < 0
    if not unheld.any():
        return group, position, False
    rows = shape[0]
    row_size = numel // rows
    owner_of_row = owner_group(torch.arange(rows), rows, num_groups)
    first_row = torch.searchsorted(owner_of_row, torch.arange(num_groups))
    held = torch.tensor([pieces[g].numel(shape) if g in pieces else 0 for g in range(num_groups)])
    owner = owner_of_row[flat // row_size]
    group = torch.where(unheld, owner, group)
    position = torch.where(unheld, held[owner] + flat - first_row[owner] * row_size, position)
    return group, position, True


class Exchange:
    """Runs one round transition for one rank of group ``group``.

    With G ranks per group (replicas holding identical values), every replica plans the
    whole transition but moves only its stripe, ``1/G`` of each message, to the replica
    with the same index in the other groups (``stripe_pg``: slow links); an all-gather
    inside the group (``intra_pg``: fast links) completes what arrived.
    """

    def __init__(self, group: int, num_groups: int, *, replica: int = 0, group_size: int = 1,
                 stripe_pg: dist.ProcessGroup | None = None, intra_pg: dist.ProcessGroup | None = None,
                 wire_dtype: str = "fp32", device: torch.device | str = "cpu") -> None:
        self.group = group
        self.device = torch.device(device)
        self.S = num_groups
        self.replica = replica
        self.G = group_size
        self.stripe_pg = stripe_pg
        self.intra_pg = intra_pg
        self.wire = WIRE_DTYPES[wire_dtype]
        self.owners = OwnerShards(group, num_groups, self.device)
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
        self._average_shared(shared, read, write, stats)
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

    def _average_shared(self, shared, read, write, stats) -> None:
        """Average the shared set: reduce-scatter then all-gather among the S groups
        (bandwidth-optimal: each rank sends ``2 (S-1)/S`` of its stripe)."""
        if not shared:
            return
        flat = torch.cat([read(f.name).reshape(-1).to(torch.float32) for f in shared])
        if self.S > 1:
            stripe = _stripe(flat, self.G, self.replica).to(self.wire)
            chunk = -(-stripe.numel() // self.S)
            padded = torch.zeros(chunk * self.S, dtype=self.wire, device=self.device)
            padded[: stripe.numel()] = stripe
            mine = torch.empty(chunk, dtype=self.wire, device=self.device)
            _reduce_scatter(mine, padded, group=self.stripe_pg)
            _all_gather(padded, mine, group=self.stripe_pg)
            stats.allreduce_sent += 2 * (self.S - 1) * chunk * padded.element_size()
            stripe = padded[: stripe.numel()]
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
            total = torch.zeros(n, dtype=torch.float32, device=self.device) if mine is None else mine.reshape(-1).to(torch.float32).clone()
            for a, offset in slots:
                total += received[a][offset : offset + n].to(torch.float32)
            write(f.name, (total / count).view(f.shape).to(f.dtype))

        finish.append(done)

    # ---- index pieces (IST), with owner shards ------------------------------

    def _plan_indexed(self, f, read, write, sends, recv_plan, finish) -> None:
        me, S = self.group, self.S
        group_now, pos_now, unheld_now = self.locations(f, now=True)
        group_next, pos_next, unheld_next = self.locations(f, now=False)
        if unheld_now or unheld_next:
            self.owners.ensure(f.name, f.shape, f.dtype)  # optimizer state starts at zero
        store = self.owners.values.get(f.name, torch.zeros(0, dtype=f.dtype, device=self.device))
        mine_sub = read(f.name) if me in f.now else None
        local_now = torch.cat([
            mine_sub.reshape(-1).to(torch.float32) if mine_sub is not None else torch.zeros(0, device=self.device),
            store.reshape(-1).to(torch.float32),
        ])
        # what lives here now, by destination (stable sort keeps flat order within each)
        here = (group_now == me).nonzero().flatten()
        to = group_next[here]
        order = torch.sort(to, stable=True).indices
        outgoing = torch.split(local_now[pos_now[here[order]].to(self.device)], torch.bincount(to, minlength=S).tolist())
        for c in range(S):
            if c != me and outgoing[c].numel():
                sends[c].append(outgoing[c])
        # what lives here next, by source
        arriving = (group_next == me).nonzero().flatten()
        if not arriving.numel():
            return
        source = group_now[arriving]
        order = torch.sort(source, stable=True).indices
        counts = torch.bincount(source, minlength=S).tolist()
        targets = torch.split(pos_next[arriving[order]].to(self.device), counts)
        kept = torch.split(pos_now[arriving[order]].to(self.device), counts)[me]
        held_next = f.next[me].numel(f.shape) if me in f.next else 0
        stored = pos_next[arriving]
        stored = stored[stored >= held_next].to(self.device)
        slots = []
        for a in range(S):
            if a != me and counts[a]:
                slots.append((a, sum(m for _, _, m in recv_plan[a]), counts[a], targets[a]))
                recv_plan[a].append((f, None, counts[a]))

        def done(received, f=f, slots=slots, store=store):
            value = torch.zeros(held_next + store.numel(), dtype=torch.float32, device=self.device)
            value[targets[me]] = local_now[kept]
            for a, offset, k, positions in slots:
                value[positions] = received[a][offset : offset + k]
            if held_next:
                write(f.name, value[:held_next].view(_piece_shape(f.next[me], f.shape)).to(f.dtype))
            store.view(-1)[stored - held_next] = value[stored].to(store.dtype)

        finish.append(done)

    def locations(self, f: Field, now: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
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
        full = [torch.cat(m).to(self.wire) if m else torch.zeros(0, dtype=self.wire, device=self.device) for m in sends]
        recv = [torch.empty(_stripe_size(n, self.G, self.replica), dtype=self.wire, device=self.device)
                for n in recv_sizes]
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
        mine = torch.cat(stripes) if stripes else torch.zeros(0, dtype=self.wire, device=self.device)
        lengths = [sum(_stripe_size(n, self.G, g) for n in sizes) for g in range(self.G)]
        width = max(lengths)
        padded = torch.zeros(width, dtype=mine.dtype, device=self.device)
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


def _piece_shape(piece: Piece, shape: torch.Size) -> tuple[int, ...]:
    if piece.index is None:
        return tuple(shape)
    return tuple(
        size if (dim >= len(piece.index) or piece.index[dim] is None) else len(piece.index[dim])
        for dim, size in enumerate(shape)
    )
