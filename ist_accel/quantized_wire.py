"""The quantized wire inside a round's exchange (:mod:`ist_accel.wire_codec` holds the
codes): which runs each message is made of, a whole tensor's own value rounded as its
holders send it, and the shared set's mean in two quantized steps.

* **Messages.** A message to (from) group ``c`` is one run per tensor, in the plan's
  order; its random numbers are named by (tensor, sending group), so every copy a sender
  sends of the same tensor carries the same codes.
* **Whole tensors with several holders, or sent elsewhere too** (ResIST's blocks, the
  shared set when it travels in the messages): each next holder averages every holder's
  *decoded* value, its own included, so all next holders agree to the bit.
* **The shared set** (every group holds it whole in both rounds): a reduce-scatter then an
  all-gather, both quantized, the sum in the value dtype, as INTELLECT-1 does (arXiv
  2412.01152 Sec. 3.2). Its blocks are cut into S chunks at block boundaries; rank ``j``
  receives every group's codes of chunk ``j`` (its own rounded as well), sums them in group
  order, divides by S, and sends the rounded mean to all: ``2 (S-1)/S`` of the codes, as a
  ring all-reduce moves of values. Every rank, ``j`` included, takes the decoded mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .topology import Topology
from .transfer import TransferPlan
from .transport import Transport
from .wire_codec import Run, WireCodec, noise, stream_id


def _is_raw(plan: TransferPlan, i: int) -> bool:
    """Fields that travel exactly: frozen ones (they would drift with every move), scalar
    optimizer state (Adam's step count) and float buffers: a BatchNorm running variance
    rounded to a coarse code can become 0, and the scored model then divides by sqrt(eps)
    (int4 on CIFAR-10: evaluations at chance between good ones). Buffers are a few values
    per channel: ~0.5 % of a ResNet's fields."""
    f = plan.fields[i]
    return f.frozen or f.scalar or f.buffer or len(f.shape) == 0


def message_runs(plan: TransferPlan, peer: int, outgoing: bool) -> list[Run]:
    """The runs of this group's message to (``outgoing``) or from ``peer``."""
    sender = plan.group if outgoing else peer
    segments = plan.outgoing.get(peer, []) if outgoing else plan.incoming.get(peer, [])
    wholes = plan.whole_out.get(peer, []) if outgoing else [
        (avg.field, where) for avg in plan.averages for holder, where in avg.parts if holder == peer]
    items = sorted([(s.offset, s.field, s) for s in segments] + [(at, i, None) for i, at in wholes],
                   key=lambda item: item[0])
    runs: list[Run] = []
    current: list = []

    def close() -> None:
        if not current:
            return
        i = current[0][1]
        f = plan.fields[i]
        start = current[0][0]
        n = sum(seg.numel if seg is not None else f.numel for _, _, seg in current)
        segments = [seg for _, _, seg in current]
        index = None if segments[0] is None else (  # computed when the run is coded, not kept
            lambda: torch.cat([seg.global_index(f.shape) for seg in segments]))
        runs.append(Run(start, n, stream_id(f.name, sender), index, _is_raw(plan, i)))
        current.clear()

    for item in items:
        if current and item[1] != current[0][1]:
            close()
        current.append(item)
    close()
    return runs


def round_own_whole(codec: WireCodec, plan: TransferPlan, i: int, value: torch.Tensor) -> torch.Tensor:
    """This group's value of whole tensor ``i`` as it left in its messages (decoded)."""
    flat = value.reshape(-1)
    index = torch.arange(flat.numel(), device=flat.device)
    u = noise(codec.seed, plan.round, stream_id(plan.fields[i].name, plan.group), index, flat.dtype)
    return codec.roundtrip(flat, index // codec.block, u).view(value.shape)


def rounds_own_whole(plan: TransferPlan, i: int, parts: Sequence[tuple[int, int | str]]) -> bool:
    """Whether this group's own part of whole tensor ``i`` must be its sent value: when it
    averages with other holders, or other groups receive it too."""
    if _is_raw(plan, i):
        return False
    return len(parts) > 1 or any(i == field for sent in plan.whole_out.values() for field, _ in sent)


# ---- the shared set --------------------------------------------------------------


def block_bounds(plan: TransferPlan, block: int, parts: int, lo: int = 0, hi: int | None = None) -> list[int]:
    """``parts + 1`` offsets in the shared bucket that cut the blocks inside ``[lo, hi)``
    (blocks of ``block`` from each tensor's start; ``lo``, ``hi`` at block ends) into
    near-equal counts."""
    hi = plan.shared_numel if hi is None else hi
    ends = [e for _, offset, n in plan.shared for k in range(math.ceil(n / block))
            if lo < (e := min(offset + (k + 1) * block, offset + n)) <= hi]
    return [lo] + [ends[len(ends) * (p + 1) // parts - 1] if len(ends) * (p + 1) // parts else lo
                   for p in range(parts)]


def _chunk_runs(plan: TransferPlan, lo: int, hi: int, *stream) -> list[Run]:
    """Runs of bucket elements ``[lo, hi)`` (offsets from ``lo``), random numbers named by
    (tensor, ``stream``) and indexed within the tensor."""
    runs = []
    for i, offset, n in plan.shared:
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            runs.append(Run(a - lo, b - a, stream_id(plan.fields[i].name, "shared", *stream),
                            torch.arange(a - offset, b - offset), _is_raw(plan, i)))
    return runs


def quantized_shared_mean(codec: WireCodec, transport: Transport, topology: Topology, plan: TransferPlan,
                          bucket: torch.Tensor, scratch) -> None:
    """Replace ``bucket`` (this group's shared set) by the S groups' quantized mean, in
    place (module docstring). With G ranks per group each replica does this for its
    block-aligned stripe; an all-gather inside the group completes the bucket."""
    top, S, G, me = topology, topology.S, topology.G, topology.group_index
    stripes = block_bounds(plan, codec.block, G)
    s_lo, s_hi = stripes[top.replica], stripes[top.replica + 1]
    inner = block_bounds(plan, codec.block, S, s_lo, s_hi)
    chunks = [(inner[j], inner[j + 1]) for j in range(S)]
    # step 1: chunk j of every group's values to group j
    sizes = [codec.payload_size(_chunk_runs(plan, lo, hi, 1, me)) for lo, hi in chunks]
    sends = {}
    for j, (lo, hi) in enumerate(chunks):
        if j != me:
            out = scratch("q_send", sum(sizes), torch.uint8)[sum(sizes[:j]) : sum(sizes[: j + 1])]
            sends[top.peer(j)] = codec.encode(bucket[lo:hi], _chunk_runs(plan, lo, hi, 1, me), plan.round, out)
    lo, hi = chunks[me]
    mine = {a: _chunk_runs(plan, lo, hi, 1, a) for a in range(S)}
    recv_sizes = {a: codec.payload_size(mine[a]) for a in range(S) if a != me}
    flat = scratch("q_recv", sum(recv_sizes.values()), torch.uint8)
    recvs, at = {}, 0
    for a in sorted(recv_sizes):
        recvs[top.peer(a)] = flat[at : at + recv_sizes[a]]
        at += recv_sizes[a]
    works = transport.start(sends, recvs, "shared")
    own = scratch("q_own", codec.payload_size(mine[me]), torch.uint8)
    codec.encode(bucket[lo:hi], mine[me], plan.round, own)
    for work in works:
        work.wait()
    total = scratch("q_sum", hi - lo, bucket.dtype)
    part = scratch("q_part", hi - lo, bucket.dtype)
    for a in range(S):  # in group order: every rank computes the same bits
        codec.decode(own if a == me else recvs[top.peer(a)], mine[a], total if a == 0 else part)
        if a:
            total.add_(part)
    total.div_(S)
    # step 2: the rounded mean of chunk j from group j to all
    width = max(codec.payload_size(_chunk_runs(plan, a, b, 2)) for a, b in chunks)
    gathered = scratch("q_gather", S * width, torch.uint8)
    codec.encode(total, _chunk_runs(plan, lo, hi, 2), plan.round, scratch("q_mean", width, torch.uint8))
    transport.all_gather([gathered[j * width : (j + 1) * width] for j in range(S)],
                         scratch("q_mean", width, torch.uint8), "shared", group=top.stripe)
    for j, (a, b) in enumerate(chunks):
        codec.decode(gathered[j * width : (j + 1) * width], _chunk_runs(plan, a, b, 2), bucket[a:b])
    if G > 1:  # the replicas' stripes, over the fast links
        width = max(stripes[g + 1] - stripes[g] for g in range(G))
        pieces = scratch("q_intra", G * width, bucket.dtype)
        local = scratch("q_intra_local", width, bucket.dtype)
        local[: s_hi - s_lo].copy_(bucket[s_lo:s_hi])
        transport.all_gather([pieces[g * width : (g + 1) * width] for g in range(G)], local, "intra", group=top.intra)
        for g in range(G):
            bucket[stripes[g] : stripes[g + 1]].copy_(pieces[g * width : g * width + stripes[g + 1] - stripes[g]])


__all__ = ["block_bounds", "message_runs", "quantized_shared_mean", "round_own_whole", "rounds_own_whole"]
