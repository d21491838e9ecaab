"""Carrying out a :class:`~ist_accel.transfer.TransferPlan`: pack, wire, unpack.

* **pack** reads every value that leaves its place (the shared set into one bucket, each
  message to another group, and this group's own values that change place) into flat
  buffers that are allocated once and reused round after round;
* **wire** all-reduces the shared bucket among the S groups and moves every message in
  one batch of point-to-point sends: each unit straight from its holder(s) to its next
  holder(s). With G ranks per group every replica moves only its ``1/G`` stripe of each
  message to its counterpart in the other groups (slow links) and an all-gather inside
  the group (fast links) completes what arrived;
* **unpack** writes each received box into the next round's subnet tensor or owner shard,
  averages whole tensors over their holders, and divides the shared bucket by S.

Reads all happen in pack and writes all in unpack, so the current and the next round's
tensors may be the same storage. Values that stay where they are are not touched.
The phases are separate so that a test can run several groups' packs and unpacks in one
process and route the messages itself.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .exchange_store import Buffers, OwnerShards
from .quantized_wire import message_runs, quantized_shared_mean, round_own_whole, rounds_own_whole
from .topology import Topology
from .transfer import Segment, TransferPlan, read_box, write_box
from .transport import Transport
from .wire_codec import QUANTIZED, WireCodec

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def value_dtype(dtypes) -> torch.dtype:
    """The dtype values are averaged in: float64 when the model holds float64 tensors
    (exact checks), else float32 (master values of fp32, bf16 or fp16 models)."""
    return torch.float64 if torch.float64 in set(dtypes) else torch.float32


@dataclass
class Timings:
    """Seconds of one exchange by phase (``wire`` includes waiting for peers)."""

    pack: float = 0.0
    wire: float = 0.0
    unpack: float = 0.0
    shared: float = 0.0  # of wire: the shared bucket's all-reduce


@dataclass
class Packed:
    """What pack produced: the bucket, the messages by peer group, the keep message."""

    bucket: torch.Tensor
    messages: dict[int, torch.Tensor]
    keep: torch.Tensor
    received: dict[int, torch.Tensor] = field(default_factory=dict)


class Exchange:
    """Runs transfer plans for one rank (module docstring)."""

    def __init__(self, topology: Topology, transport: Transport, wire_dtype: str = "fp32",
                 device: torch.device | str = "cpu", values: torch.dtype = torch.float32,
                 wire_block: int = 64, seed: int = 0) -> None:
        self.topology, self.transport = topology, transport
        self.values = values  # the dtype averages are computed in (:func:`value_dtype`)
        # quantized: messages are packed in the value dtype, then encoded into bytes (:mod:`ist_accel.wire_codec`)
        self.codec = WireCodec(wire_dtype, wire_block, seed, values) if wire_dtype in QUANTIZED else None
        self.wire = values if self.codec else WIRE_DTYPES[wire_dtype]  # the dtype messages are packed in
        self._runs: tuple[TransferPlan | None, dict] = (None, {})
        self.device = torch.device(device)
        self.owners = OwnerShards(self.device)
        self.buffers = Buffers(self.device)
        # the subnet's shared tensors as views of one flat buffer, and its layout (set by the engine)
        self.flat_shared: tuple[torch.Tensor, tuple[tuple[str, int, int], ...]] | None = None

    def wire_and_unpack(self, plan: TransferPlan, packed: Packed, targets: Mapping[int, torch.Tensor],
                        timings: Timings) -> None:
        """Wire and unpack what :meth:`pack` produced, adding their seconds to ``timings``."""
        start = time.perf_counter()
        timings.shared = self.wire_messages(plan, packed)
        timings.wire = time.perf_counter() - start
        start = time.perf_counter()
        self.unpack(plan, packed, targets)
        timings.unpack = time.perf_counter() - start

    # ---- pack -------------------------------------------------------------------

    def _flat_bucket(self, plan: TransferPlan) -> torch.Tensor | None:
        """The flat shared buffer, when it is laid out as this plan's bucket."""
        if self.flat_shared is None or self.wire != self.values:
            return None
        flat, layout = self.flat_shared
        ok = layout == tuple((plan.fields[i].name, offset, n) for i, offset, n in plan.shared)
        return flat if ok else None

    def pack(self, plan: TransferPlan, current: Mapping[int, torch.Tensor]) -> Packed:
        self._ensure_owners(plan)
        bucket = self._flat_bucket(plan)
        if bucket is None:
            bucket = self.buffers.get("shared", plan.shared_numel, self.wire)
            for i, offset, n in plan.shared:
                bucket[offset : offset + n].copy_(current[i].reshape(-1))
        send = self.buffers.get("send", sum(plan.send_sizes.values()), self.wire)
        messages, offset = {}, 0
        for c in sorted(plan.send_sizes):
            messages[c] = send[offset : offset + plan.send_sizes[c]]
            offset += plan.send_sizes[c]
            for seg in plan.outgoing[c]:
                self._take(plan, current, seg, messages[c])
            for i, at in plan.whole_out[c]:
                value = current[i]
                messages[c][at : at + value.numel()].copy_(value.reshape(-1))
        if self.codec:
            messages = self._encode(plan, messages)
        keep = self.buffers.get("keep", plan.keep_size, self.values)  # local: not rounded to the wire dtype
        for seg in plan.keep_out:
            self._take(plan, current, seg, keep)
        for i, at in plan.whole_keep:
            value = current[i]
            keep[at : at + value.numel()].copy_(value.reshape(-1))
        return Packed(bucket, messages, keep)

    def _encode(self, plan: TransferPlan, messages: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        sizes = {c: self.codec.payload_size(self.runs(plan, c, True)) for c in messages}
        flat = self.buffers.get("send_codes", sum(sizes.values()), torch.uint8)
        out, offset = {}, 0
        for c in sorted(messages):
            out[c] = self.codec.encode(messages[c], self.runs(plan, c, True), plan.round,
                                       flat[offset : offset + sizes[c]])
            offset += sizes[c]
        return out

    def _take(self, plan: TransferPlan, current: Mapping[int, torch.Tensor], seg: Segment, out: torch.Tensor) -> None:
        source = current[seg.field] if seg.store == "sub" else self.owners.values[plan.fields[seg.field].name]
        read_box(source, seg.rows, seg.cols, out[seg.offset : seg.offset + seg.numel].view(seg.shape))

    # ---- wire -------------------------------------------------------------------

    def wire_messages(self, plan: TransferPlan, packed: Packed) -> float:
        """Move the bucket and the messages; returns the seconds of the shared all-reduce."""
        top, G = self.topology, self.topology.G
        sizes = plan.recv_sizes
        if self.codec:
            sizes = {a: self.codec.payload_size(self.runs(plan, a, False)) if n else 0 for a, n in sizes.items()}
        carrier = torch.uint8 if self.codec else self.wire
        recv = self.buffers.get("recv", sum(_stripe_size(n, G, top.replica) for n in sizes.values()), carrier)
        stripes, offset = {}, 0
        for a in sorted(sizes):
            k = _stripe_size(sizes[a], G, top.replica)
            stripes[a] = recv[offset : offset + k]
            offset += k
        # the units' messages fly while the shared set is all-reduced
        works = self.transport.start({top.peer(c): _stripe(m, G, top.replica) for c, m in packed.messages.items()},
                                     {top.peer(a): s for a, s in stripes.items()}, "exchange")
        start = time.perf_counter()
        if plan.shared_numel and top.S > 1 and self.codec:
            quantized_shared_mean(self.codec, self.transport, top, plan, packed.bucket, self.buffers.get)
        elif plan.shared_numel and top.S > 1:
            stripe = _stripe(packed.bucket, G, top.replica)
            self.transport.all_reduce(stripe, "shared", group=top.stripe)
            if G > 1:
                self._gather_stripes({0: packed.bucket}, {0: packed.bucket.numel()}, "bucket")
        shared = time.perf_counter() - start
        for work in works:
            work.wait()
        if G > 1:
            full = self.buffers.get("recv_full", sum(sizes.values()), carrier)
            whole, offset = {}, 0
            for a in sorted(sizes):
                whole[a] = full[offset : offset + sizes[a]]
                offset += sizes[a]
            self._gather_stripes(whole, sizes, "gathered", mine=stripes, dtype=carrier)
            packed.received = whole
        else:
            packed.received = stripes
        if self.codec:
            packed.received = self._decode(plan, packed.received)
        return shared

    def _decode(self, plan: TransferPlan, received: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        flat = self.buffers.get("recv_values", sum(plan.recv_sizes.values()), self.values)
        out, offset = {}, 0
        for a in sorted(plan.recv_sizes):
            n = plan.recv_sizes[a]
            out[a] = flat[offset : offset + n]
            if n:
                self.codec.decode(received[a], self.runs(plan, a, False), out[a])
            offset += n
        return out

    def _gather_stripes(self, whole: dict[int, torch.Tensor], sizes: Mapping[int, int], name: str,
                        mine: dict[int, torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> None:
        """Fill each ``whole[k]`` (``sizes[k]`` elements) from every replica's stripe of it:
        one all-gather inside the group of the replicas' stripes, padded to one length."""
        top, G = self.topology, self.topology.G
        keys = sorted(sizes)
        lengths = [sum(_stripe_size(sizes[k], G, g) for k in keys) for g in range(G)]
        width = max(lengths)
        gathered = self.buffers.get(name, G * width, dtype or self.wire)
        parts = [gathered[g * width : (g + 1) * width] for g in range(G)]
        local = self.buffers.get(name + "_local", width, dtype or self.wire)
        offset = 0
        for k in keys:
            piece = mine[k] if mine is not None else _stripe(whole[k], G, top.replica)
            local[offset : offset + piece.numel()].copy_(piece)
            offset += piece.numel()
        self.transport.all_gather(parts, local, "intra", group=top.intra)
        offsets = [0] * G
        for k in keys:
            start = 0
            for g in range(G):
                m = _stripe_size(sizes[k], G, g)
                whole[k][start : start + m].copy_(parts[g][offsets[g] : offsets[g] + m])
                start += m
                offsets[g] += m

    # ---- unpack -----------------------------------------------------------------

    def unpack(self, plan: TransferPlan, packed: Packed, targets: Mapping[int, torch.Tensor]) -> None:
        for seg in plan.keep_in:
            self._put(plan, targets, seg, packed.keep)
        for a, segments in plan.incoming.items():
            for seg in segments:
                self._put(plan, targets, seg, packed.received[a])
        me = plan.group
        for avg in plan.averages:
            target = targets[avg.field]
            n = target.numel()

            def part(holder: int, where: int | str) -> torch.Tensor:
                if holder != me:
                    return packed.received[holder][where : where + n].view(target.shape)
                return target if where == "inplace" else packed.keep[where : where + n].view(target.shape)

            if self.codec and rounds_own_whole(plan, avg.field, avg.parts):  # as the other holders receive it
                own = [where for holder, where in avg.parts if holder == me]
                if own:
                    value = part(me, own[0])
                    value.copy_(round_own_whole(self.codec, plan, avg.field, value.to(self.values)))
            first_inplace = avg.parts[0] == (me, "inplace") and target.dtype == self.values
            acc = target if first_inplace else self.buffers.get("average", n, self.values).view(target.shape)
            if not first_inplace:
                acc.copy_(part(*avg.parts[0]))
            for holder, where in avg.parts[1:]:
                acc.add_(part(holder, where))
            if avg.count > 1:
                acc.div_(avg.count)
            if acc is not target:
                target.copy_(acc)
        for i in self._kept_but_sent(plan):  # held alone and kept, but sent to others too
            targets[i].copy_(round_own_whole(self.codec, plan, i, targets[i].to(self.values)))
        S = self.topology.S
        divide = S > 1 and self.codec is None  # a quantized shared set arrives as the mean
        if plan.shared and packed.bucket is self._flat_bucket(plan):  # the shared tensors are views of it
            if divide:
                packed.bucket.div_(S)
            return
        for i, offset, n in plan.shared:
            target = targets[i]
            target.copy_(packed.bucket[offset : offset + n].view(target.shape))
            if divide:
                target.div_(S)

    def _kept_but_sent(self, plan: TransferPlan) -> list[int]:
        """Whole tensors this group alone held, keeps in place, and sends to other next holders."""
        if not self.codec:
            return []
        averaged = {avg.field for avg in plan.averages}
        sent = {i for items in plan.whole_out.values() for i, _ in items}
        return [i for i in sorted(sent - averaged) if plan.group in plan.next[plan.fields[i].param].holders
                and rounds_own_whole(plan, i, [(plan.group, "inplace")])]

    def _put(self, plan: TransferPlan, targets: Mapping[int, torch.Tensor], seg: Segment, source: torch.Tensor) -> None:
        target = targets[seg.field] if seg.store == "sub" else self.owners.values[plan.fields[seg.field].name]
        write_box(target, seg.rows, seg.cols, source[seg.offset : seg.offset + seg.numel].view(seg.shape))

    def _ensure_owners(self, plan: TransferPlan) -> None:
        for f in plan.fields:
            if f.name in plan.owned:
                self.owners.ensure(f.name, plan.owned[f.name], f.shape, f.dtype)

    def nbytes(self) -> int:
        """Memory the exchange keeps between rounds: its buffers (owner shards not included)."""
        return self.buffers.nbytes()

    @property
    def bytes_per_element(self) -> float:
        """Wire bytes per value (a quantized wire's codes and their share of the scales)."""
        return self.codec.bytes_per_element() if self.codec else torch.tensor([], dtype=self.wire).element_size()

    @property
    def read_dtype(self) -> torch.dtype:
        """The dtype an evaluation's read of the global model travels in: the wire's, bf16
        under a quantized wire (reads have no blocks of their own)."""
        return torch.bfloat16 if self.codec else self.wire

    def runs(self, plan: TransferPlan, peer: int, outgoing: bool):
        """The quantized wire's runs of a message (cached for the plan)."""
        held, cache = self._runs
        if held is not plan:
            cache = {}
            self._runs = (plan, cache)
        key = (peer, outgoing)
        if key not in cache:
            cache[key] = message_runs(plan, peer, outgoing)
        return cache[key]


def _stripe_size(n: int, parts: int, i: int) -> int:
    return n // parts + (i < n % parts)


def _stripe(t: torch.Tensor, parts: int, i: int) -> torch.Tensor:
    """Part ``i`` of ``parts`` near-equal contiguous parts of a flat tensor."""
    if parts == 1:
        return t
    start = sum(_stripe_size(t.numel(), parts, j) for j in range(i))
    return t[start : start + _stripe_size(t.numel(), parts, i)]


__all__ = ["Buffers", "Exchange", "OwnerShards", "Packed", "Timings", "WIRE_DTYPES", "value_dtype"]
