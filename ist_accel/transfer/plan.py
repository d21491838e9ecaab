"""The transfer plan of one round transition (IST Alg. 1 and ResIST Alg. 1: collect,
average over holders, dispatch the next assignment), as seen by one subnet group: what it
sends, receives, keeps and averages, laid out message by message (:class:`TransferPlan`,
built by :func:`build_plan` from two rounds' layouts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .box_io import compact_index, local_index
from .cells import Box, TransitionBoxes, box_numel, trailing_numel, whole_bound
from .layout import FieldSpec, Layout, owner_rows


@dataclass
class Segment:
    """One box of one field inside a message: ``numel`` elements at ``offset``, read from
    (sender) or written to (receiver) ``store`` ("sub": the subnet tensor, "own": the
    owner shard) at local ``rows`` x ``cols``."""

    field: int
    offset: int
    numel: int
    store: str
    rows: torch.Tensor | None
    cols: torch.Tensor | None
    shape: tuple[int, ...]
    box: Box | None = None  # the global rows x columns (the quantized wire's blocks follow them)

    def global_index(self, shape: torch.Size) -> torch.Tensor:
        """The flat global indices of the segment's elements, in its (row-major) order."""
        rows = torch.arange(shape[0]) if self.box is None or self.box.rows is None else torch.from_numpy(
            np.asarray(self.box.rows, dtype=np.int64))
        if len(shape) == 1:
            return rows
        cols = torch.arange(shape[1]) if self.box is None or self.box.cols is None else torch.from_numpy(
            np.asarray(self.box.cols, dtype=np.int64))
        k = trailing_numel(shape)
        cells = rows[:, None] * shape[1] + cols[None, :]
        return (cells[..., None] * k + torch.arange(k)).reshape(-1)


@dataclass
class Average:
    """A whole tensor this group holds next round: the mean of its current holders'
    values, summed in holder order (so every next holder computes the same bits).
    ``parts`` are (holder, where): for another holder the offset in its message; for this
    group "inplace" (its value is already in the target) or an offset in the keep message."""

    field: int
    parts: list[tuple[int, int | str]]

    @property
    def count(self) -> int:
        return len(self.parts)


@dataclass
class TransferPlan:
    """What one group sends, receives and keeps in one round transition (:mod:`ist_accel.transfer`).

    ``outgoing[c]`` / ``incoming[a]`` are the segments of the message to group ``c`` /
    from group ``a``; ``keep_out`` / ``keep_in`` the same for values this group moves
    within itself (a kept unit changing place); ``shared`` the bucket layout of the
    fields every group holds whole in both rounds; ``averages`` the whole tensors held
    next round; ``bound_sent`` / ``bound_received`` this group's lower bound (elements)."""

    group: int
    num_groups: int
    round: int
    fields: list[FieldSpec]
    now: dict[str, Layout]
    next: dict[str, Layout]
    shared: list[tuple[int, int, int]] = field(default_factory=list)  # (field, offset, numel)
    shared_numel: int = 0
    outgoing: dict[int, list[Segment]] = field(default_factory=dict)
    incoming: dict[int, list[Segment]] = field(default_factory=dict)
    keep_out: list[Segment] = field(default_factory=list)
    keep_in: list[Segment] = field(default_factory=list)
    averages: list[Average] = field(default_factory=list)
    whole_out: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # peer -> (field, offset)
    whole_keep: list[tuple[int, int]] = field(default_factory=list)  # (field, offset) staged in the keep message
    send_sizes: dict[int, int] = field(default_factory=dict)
    recv_sizes: dict[int, int] = field(default_factory=dict)
    keep_size: int = 0
    owned: dict[str, tuple[int, int]] = field(default_factory=dict)  # field -> owner rows, where some element is unheld
    bound_sent: float = 0.0
    bound_received: float = 0.0

    def names(self, field_index: int) -> tuple[str | None, str | None]:
        """(subnet tensor now, subnet tensor next) of a field in this group (None: not held)."""
        f = self.fields[field_index]
        return self.now[f.param].subnet_names.get(self.group), self.next[f.param].subnet_names.get(self.group)

    def to(self, device: torch.device | str) -> TransferPlan:
        """Move the segments' index vectors to ``device`` (in place)."""
        device = torch.device(device)
        if device.type != "cpu":
            for seg in [*self.keep_out, *self.keep_in, *(s for v in self.outgoing.values() for s in v),
                        *(s for v in self.incoming.values() for s in v)]:
                seg.rows = None if seg.rows is None else seg.rows.to(device)
                seg.cols = None if seg.cols is None else seg.cols.to(device)
        return self

    def nbytes(self) -> int:
        """Memory the plan keeps: layouts (per-coordinate holders and positions) and the
        segments' index vectors."""
        layouts = sum(layout.nbytes() for layout in {id(x): x for x in (*self.now.values(), *self.next.values())}.values())
        segments = [*self.keep_out, *self.keep_in, *(s for v in self.outgoing.values() for s in v),
                    *(s for v in self.incoming.values() for s in v)]
        index = sum(t.numel() * t.element_size() for s in segments for t in (s.rows, s.cols) if t is not None)
        return layouts + index


def build_plan(fields: Sequence[FieldSpec], now: Mapping[str, Layout], following: Mapping[str, Layout],
               group: int, num_groups: int, round_: int = 0) -> TransferPlan:
    """The :class:`TransferPlan` of ``group`` between two rounds' layouts."""
    S, me = num_groups, group
    plan = TransferPlan(me, S, round_, list(fields), dict(now), dict(following))
    out: dict[int, list] = {c: [] for c in range(S) if c != me}
    inc: dict[int, list] = {a: [] for a in range(S) if a != me}
    sizes_out = dict.fromkeys(out, 0)
    sizes_in = dict.fromkeys(inc, 0)
    keep = 0
    boxes_cache: dict[tuple, TransitionBoxes] = {}
    in_messages = shared_in_messages(fields, now, following, S)
    for i, f in enumerate(fields):
        a, b = now[f.param], following[f.param]
        if f.scalar or a.whole:
            if not b.whole and not f.scalar:
                raise ValueError(f"{f.name}: held whole this round but cut next round; not supported")
            H, Hn = a.holders, b.holders
            if not H or not Hn:
                raise ValueError(f"{f.name}: every whole tensor needs a holder in both rounds (holders now {H}, next {Hn})")
            if len(H) == len(Hn) == S and not in_messages:  # the shared set: one bucket, all-reduced
                sent, received = whole_bound(f, H, Hn, S)
                plan.bound_sent += sent[me]
                plan.bound_received += received[me]
                if not f.frozen:
                    plan.shared.append((i, plan.shared_numel, f.numel))
                    plan.shared_numel += f.numel
                continue
            sent, received = whole_bound(f, H, Hn, S)
            plan.bound_sent += sent[me]
            plan.bound_received += received[me]
            senders = H[:1] if f.frozen else H
            if me in senders:
                for c in Hn:
                    if c != me and (not f.frozen or c not in H):
                        out[c].append(("whole", i, sizes_out[c]))
                        sizes_out[c] += f.numel
            if me not in Hn:
                continue
            parts: list[tuple[int, int | str]] = []  # (holder, offset in its message | "inplace" | keep offset)
            for s in senders:
                if s != me and (not f.frozen or me not in H):
                    parts.append((s, sizes_in[s]))
                    sizes_in[s] += f.numel
                elif s == me:
                    if a.subnet_names[me] == b.subnet_names[me]:
                        parts.append((me, "inplace"))
                    else:
                        parts.append((me, keep))
                        plan.whole_keep.append((i, keep))
                        keep += f.numel
            if me in H and f.frozen and me not in senders:  # frozen: keep my own copy
                if a.subnet_names[me] == b.subnet_names[me]:
                    continue
                parts = [(me, keep)]
                plan.whole_keep.append((i, keep))
                keep += f.numel
            if parts == [(me, "inplace")]:
                continue  # kept where it is: nothing to do
            plan.averages.append(Average(i, parts))
            continue
        key = (a.cut_key(), b.cut_key())
        boxes = boxes_cache.get(key)
        if boxes is None:
            boxes = boxes_cache[key] = TransitionBoxes(a, b, me, S)
        if boxes.owner:
            plan.owned[f.name] = owner_rows(f.shape[0], S, me)
        sent, received = boxes.bound
        plan.bound_sent += sent * trailing_numel(f.shape)
        plan.bound_received += received * trailing_numel(f.shape)
        for (src, dst), kinds in boxes.pairs.items():
            for (src_kind, dst_kind), box_list in kinds:
                for box in box_list:
                    n = box_numel(box, f.shape)
                    if src == me and dst == me:
                        plan.keep_out.append(_segment(i, keep, n, src_kind, box, a, me, f.shape, now=True, S=S))
                        plan.keep_in.append(_segment(i, keep, n, dst_kind, box, b, me, f.shape, now=False, S=S))
                        keep += n
                    elif src == me:
                        out[dst].append(_segment(i, sizes_out[dst], n, src_kind, box, a, me, f.shape, now=True, S=S))
                        sizes_out[dst] += n
                    else:
                        inc[src].append(_segment(i, sizes_in[src], n, dst_kind, box, b, me, f.shape, now=False, S=S))
                        sizes_in[src] += n
    for c, items in out.items():
        plan.outgoing[c] = [x for x in items if isinstance(x, Segment)]
        plan.whole_out[c] = [(x[1], x[2]) for x in items if not isinstance(x, Segment)]
    plan.incoming = inc
    plan.send_sizes, plan.recv_sizes, plan.keep_size = sizes_out, sizes_in, keep
    return plan


SMALL_SHARED_BYTES = 256 * 1024


def _is_shared(f: FieldSpec, now: Layout, nxt: Layout, S: int) -> bool:
    return (f.scalar or now.whole) and len(now.holders) == len(nxt.holders) == S


def shared_in_messages(fields: Sequence[FieldSpec], now: Mapping[str, Layout], following: Mapping[str, Layout],
                       S: int) -> bool:
    """Whether the shared set travels inside the point-to-point messages (each group sends
    its values to every other, averaged on arrival) instead of its own all-reduce: when it
    is so small (at most 256 KiB and 1% of all the fields) that the all-reduce's latency,
    not its bytes, would cost the time. It then moves ``(S-1)`` instead of ``2 (S-1)/S`` of
    its size: at most a few tenths of a percent more bytes."""
    total = sum(f.numel for f in fields)
    shared = sum(f.numel for f in fields if not f.frozen and _is_shared(f, now[f.param], following[f.param], S))
    return shared_rides_messages(S, shared, total)


def shared_rides_messages(S: int, shared: int, total: int) -> bool:
    """The rule of :func:`shared_in_messages` on the counts: ``shared`` trained elements held
    by every group in both rounds, ``total`` elements of every field."""
    if S < 3:
        return S == 2  # with two groups both ways move the same bytes
    return 0 < shared * 4 <= SMALL_SHARED_BYTES and shared <= 0.01 * total


def _segment(i: int, offset: int, n: int, kind: str, box: Box, layout: Layout, me: int, shape: torch.Size,
             now: bool, S: int) -> Segment:
    """Local addressing of a box in this group's subnet tensor or owner shard."""
    rows, cols = local_index(box, kind, layout, owner_rows(shape[0], S, me)[0])
    box_shape = (shape[0] if box.rows is None else len(box.rows),
                 *(() if len(shape) < 2 else ((shape[1] if box.cols is None else len(box.cols)),)), *shape[2:])
    return Segment(i, offset, n, kind, compact_index(rows), compact_index(cols), tuple(box_shape), box)


__all__ = ["SMALL_SHARED_BYTES", "Average", "Segment", "TransferPlan", "build_plan", "shared_in_messages",
           "shared_rides_messages"]
