"""What each group contributes when the global model is put together (:mod:`ist_accel.global_view`):
per field of one round's layouts, the shared set, the whole tensors and their holders, and
each group's boxes of the cut tensors and of its owner shard; at a round end (``agreed``),
what each group holds and what it must receive from each other group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from dataclasses import dataclass, field

import torch

from .transfer import FieldSpec, Layout, Segment, local_index, located_boxes, owner_rows
from .transfer import compact_index as _index


@dataclass
class Part(Segment):
    """A box of one field in a group's contribution: a :class:`~ist_accel.transfer.Segment`
    read at local ``rows`` x ``cols`` of its ``store``, written at global ``at_rows`` x ``at_cols``."""

    at_rows: torch.Tensor | None = None
    at_cols: torch.Tensor | None = None


@dataclass
class Contribution:
    parts: list[Part] = field(default_factory=list)
    wholes: list[tuple[int, int, int]] = field(default_factory=list)  # (field, offset, numel)
    size: int = 0


class GatherPlan:
    """What each group contributes to the global model in one round's layouts.

    ``agreed``: the holders of every whole tensor hold the same value, as at a round end
    (after a sync, a load, or before the first round): the shared set is read from this
    rank's own copy, a whole tensor comes from its first holder only, and a group receives
    only what it does not hold itself (:attr:`own`, :attr:`needs`)."""

    def __init__(self, fields: Sequence[FieldSpec], layouts: Mapping[str, Layout], num_groups: int,
                 agreed: bool = False) -> None:
        S = num_groups
        self.agreed = agreed
        self.fields = list(fields)
        self.shared: list[tuple[int, int, int]] = []
        self.shared_numel = 0
        self.frozen_shared: list[int] = []
        self.holders: dict[int, int] = {}  # whole field -> number of contributing holders
        self.contributions = [Contribution() for _ in range(S)]
        self.owned: dict[str, tuple[int, int]] = {}
        self.whole_holders: dict[int, tuple[int, ...]] = {}  # whole field held by some groups -> them
        for i, f in enumerate(self.fields):
            layout = layouts[f.param]
            if layout.whole:
                H = layout.holders
                if len(H) < S:
                    self.whole_holders[i] = tuple(H)
                if len(H) == S:
                    if f.frozen:
                        self.frozen_shared.append(i)
                    else:
                        self.shared.append((i, self.shared_numel, f.numel))
                        self.shared_numel += f.numel
                    continue
                givers = H[:1] if f.frozen else H
                self.holders[i] = len(givers)
                for g in givers:
                    c = self.contributions[g]
                    c.wholes.append((i, c.size, f.numel))
                    c.size += f.numel
                continue
            has_owner, by_group = located_boxes(layout, S)
            for g, kinds in by_group.items():
                c = self.contributions[g]
                lo = owner_rows(f.shape[0], S, g)[0]
                for kind, boxes in kinds:
                    for box in boxes:
                        rows, cols = box.rows, box.cols
                        if kind == "own":
                            self.owned[f.name] = owner_rows(f.shape[0], S, g)
                        local_rows, local_cols = local_index(box, kind, layout, lo)
                        shape = (f.shape[0] if rows is None else len(rows),
                                 *(() if len(f.shape) < 2 else (f.shape[1] if cols is None else len(cols),)),
                                 *f.shape[2:])
                        n = torch.Size(shape).numel()
                        c.parts.append(Part(i, c.size, n, kind, _index(local_rows), _index(local_cols), shape,
                                            at_rows=_index(rows), at_cols=_index(cols)))
                        c.size += n
        if agreed:
            self.frozen_shared += [i for i, _, _ in self.shared]
            self.shared, self.shared_numel = [], 0
            self.own = [self._restricted(g, lambda i: g in self.whole_holders[i]) for g in range(S)]
            self.needs = {(g, q): self._restricted(g, lambda i: self.whole_holders[i][0] == g
                                                   and q not in self.whole_holders[i])
                          for g in range(S) for q in range(S) if g != q}

    def _restricted(self, g: int, keep_whole) -> Contribution:
        """Group ``g``'s parts and the whole fields it holds that ``keep_whole(field)`` picks,
        laid out afresh (``g``'s copy of a whole field: every holder has one)."""
        out = Contribution()
        for part in self.contributions[g].parts:
            out.parts.append(dataclasses.replace(part, offset=out.size))
            out.size += part.numel
        for i in sorted(self.whole_holders):
            if g in self.whole_holders[i] and keep_whole(i):
                out.wholes.append((i, out.size, self.fields[i].numel))
                out.size += self.fields[i].numel
        return out


__all__ = ["Contribution", "GatherPlan", "Part"]
