"""The global model, put together from the subnets on demand (for evaluation and saving).

Every element of the global model lives in exactly one place in a round (its holder's
subnet, or, for IST's unheld blocks, its owner shard; :mod:`ist_accel.transfer`); whole
tensors with several holders live in each, and their value is the mean over holders, as
a sync would average them. So a gather moves, per group, only what that group holds:

* the shared set (every group holds it) is all-reduced among the groups and divided by S;
* each group's other contributions (its partitioned units and its owner shard) are packed
  into one flat fp32 buffer and all-gathered (every rank gets the model) or sent to one
  rank (``dst``). Each rank receives what it lacks, once.

Between two syncs this is exactly the model a sync now would produce; at a round end it
is the averaged global model (IST Alg. 1's evaluation of the global network).

:meth:`GlobalView.streamed` never builds the whole model: each module that owns tensors is
gathered just before its forward and dropped after it (as FSDP and ZeRO-3 do), so a rank
holds at most one module of the global model at a time. Every rank must run the same
forwards (an evaluation loop over evenly sharded data does). At a round end a module whose
tensors are all shared is read straight from this rank's subnet: nothing moves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .topology import Topology
from .transfer import FieldSpec, Layout, local_index, located_boxes, owner_rows, read_box, write_box
from .transfer import compact_index as _index
from .transport import Transport


@dataclass
class Part:
    """A box of one field in a group's contribution: read at local ``rows`` x ``cols`` of
    its ``store`` ("sub" or "own"), written at global ``at_rows`` x ``at_cols``."""

    field: int
    offset: int
    numel: int
    store: str
    rows: torch.Tensor | None
    cols: torch.Tensor | None
    at_rows: torch.Tensor | None
    at_cols: torch.Tensor | None
    shape: tuple[int, ...]


@dataclass
class Contribution:
    parts: list[Part] = field(default_factory=list)
    wholes: list[tuple[int, int, int]] = field(default_factory=list)  # (field, offset, numel)
    size: int = 0


class GatherPlan:
    """What each group contributes to the global model in one round's layouts."""

    def __init__(self, fields: Sequence[FieldSpec], layouts: Mapping[str, Layout], num_groups: int) -> None:
        S = num_groups
        self.fields = list(fields)
        self.shared: list[tuple[int, int, int]] = []
        self.shared_numel = 0
        self.frozen_shared: list[int] = []
        self.holders: dict[int, int] = {}  # whole field -> number of contributing holders
        self.contributions = [Contribution() for _ in range(S)]
        self.owned: dict[str, tuple[int, int]] = {}
        for i, f in enumerate(self.fields):
            layout = layouts[f.param]
            if layout.whole:
                H = layout.holders
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
                        c.parts.append(Part(i, c.size, n, kind, _index(local_rows), _index(local_cols), _index(rows), _index(cols),
                                            shape))
                        c.size += n


class GlobalView:
    """Gathers the global model into ``model``'s tensors (module docstring)."""

    def __init__(self, topology: Topology, transport: Transport, device: torch.device,
                 values: torch.dtype = torch.float32) -> None:
        self.topology, self.transport, self.device = topology, transport, device
        self.values = values  # the dtype contributions travel and are summed in
        self._plans: dict[int, GatherPlan] = {}

    def plan(self, round_: int, fields: Sequence[FieldSpec], layouts: Mapping[str, Layout]) -> GatherPlan:
        if round_ not in self._plans:
            self._plans = {round_: GatherPlan(fields, layouts, self.topology.S)}
        return self._plans[round_]

    def gather(self, plan: GatherPlan, current: Mapping[int, torch.Tensor], owners: Mapping[str, torch.Tensor],
               out: Mapping[int, torch.Tensor], dst: int | None = None) -> bool:
        """Fill ``out[i]`` (global-shaped tensors of every field) on every rank (``dst=None``)
        or on rank ``dst`` only; ``current`` are this group's subnet tensors, ``owners`` its
        owner shards. Returns whether this rank received the model."""
        top, S = self.topology, self.topology.S
        if dst is not None and dst % top.G:
            raise ValueError(f"gather to rank {dst}: the destination must lead its group (a multiple of G={top.G})")
        if dst is not None and not top.is_leader:
            return False  # the leaders carry their groups' contributions
        group = top.stripe  # G = 1: the default group; else this replica (leaders: replica 0) across groups
        # the shared set: summed over the groups
        bucket = torch.empty(plan.shared_numel, dtype=self.values, device=self.device)
        for i, offset, n in plan.shared:
            bucket[offset : offset + n].copy_(current[i].reshape(-1))
        if S > 1 and plan.shared_numel:
            if dst is None:
                self.transport.all_reduce(bucket, "gather", group=group)
            else:
                self.transport.reduce(bucket, dst, "gather", group=group)
        mine = plan.contributions[top.group_index]
        width = max(c.size for c in plan.contributions)
        chunk = torch.zeros(width, dtype=self.values, device=self.device)
        for part in mine.parts:
            source = current[part.field] if part.store == "sub" else owners[plan.fields[part.field].name]
            read_box(source, part.rows, part.cols, chunk[part.offset : part.offset + part.numel].view(part.shape))
        for i, offset, n in mine.wholes:
            chunk[offset : offset + n].copy_(current[i].reshape(-1))
        receiving = dst is None or top.rank == dst
        if dst is None:
            chunks = [torch.empty(width, dtype=self.values, device=self.device) for _ in range(S)] if S > 1 else [chunk]
            if S > 1 and width:
                self.transport.all_gather(chunks, chunk, "gather", group=group)
        else:
            chunks = [None] * S
            dst_group = dst // top.G
            chunks[top.group_index] = chunk
            if top.rank == dst:
                recvs = {g * top.G: torch.empty(plan.contributions[g].size, dtype=self.values, device=self.device)
                         for g in range(S) if g != dst_group and plan.contributions[g].size}
                self.transport.point_to_point({}, recvs, "gather")
                for g in range(S):
                    if g * top.G in recvs:
                        chunks[g] = recvs[g * top.G]
            elif top.group_index != dst_group and mine.size:
                self.transport.point_to_point({dst: chunk[: mine.size]}, {}, "gather")
        if not receiving:
            return False
        with torch.no_grad():
            for i in plan.holders:
                out[i].zero_()
            for g, c in enumerate(plan.contributions):
                if not c.size and not c.wholes:
                    continue
                values = chunks[g]
                for part in c.parts:
                    write_box(out[part.field], part.at_rows, part.at_cols,
                         values[part.offset : part.offset + part.numel].view(part.shape))
                for i, offset, n in c.wholes:
                    out[i].add_(values[offset : offset + n].view(out[i].shape))
            for i, count in plan.holders.items():
                if count > 1:
                    out[i].div_(count)
            for i, offset, n in plan.shared:
                out[i].copy_(bucket[offset : offset + n].view(out[i].shape))
                if S > 1:
                    out[i].div_(S)
            for i in plan.frozen_shared:
                out[i].copy_(current[i])
        return True


class _Streamer:
    """Forward hooks that materialize one module of the global model at a time."""

    def __init__(self, view: GlobalView, model: nn.Module, fields: Sequence[FieldSpec],
                 layouts: Mapping[str, Layout], current: Mapping[int, torch.Tensor],
                 owners: Mapping[str, torch.Tensor], shared_local: bool) -> None:
        self.view, self.model, self.fields, self.layouts = view, model, list(fields), layouts
        self.current, self.owners, self.shared_local = current, owners, shared_local
        index = {f.name: i for i, f in enumerate(self.fields)}
        names: dict[int, str] = {}
        for n, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
            names.setdefault(id(t), n)  # a tied tensor is known by its first name
        self.slots: dict[str, list[tuple[dict, str, int]]] = {}
        for path, module in model.named_modules():
            entries = []
            for store in (module._parameters, module._buffers):
                for attr, t in store.items():
                    if t is not None and names.get(id(t)) in index:
                        entries.append((store, attr, index[names[id(t)]]))
            if entries:
                self.slots[path] = entries
        self.plans: dict[str, GatherPlan] = {}
        self.saved: dict[str, list] = {}
        self.moved = 0  # bytes of modules gathered (not read locally)

    def before(self, path: str) -> None:
        entries = self.slots[path]
        picked = sorted({i for _, _, i in entries})
        fields = [self.fields[i] for i in picked]
        layouts = {f.param: self.layouts[f.param] for f in fields}
        local = self.shared_local and all(layouts[f.param].whole and len(layouts[f.param].holders) == self.view.topology.S
                                          for f in fields)
        if local:  # every group holds these whole, and at a round end they agree: this rank's copy
            values = {i: self.current[i] for i in picked}
        else:
            plan = self.plans.get(path)
            if plan is None:
                plan = self.plans[path] = GatherPlan(fields, layouts, self.view.topology.S)
            out = {k: torch.empty(f.shape, dtype=f.dtype, device=self.view.device) for k, f in enumerate(fields)}
            current = {k: self.current[i] for k, i in enumerate(picked) if i in self.current}
            self.view.gather(plan, current, self.owners, out, dst=None)
            values = {i: out[k] for k, i in enumerate(picked)}
            self.moved += sum(t.numel() * t.element_size() for t in out.values())
        self.saved[path] = [(store, attr, store[attr]) for store, attr, _ in entries]
        for store, attr, i in entries:
            store[attr] = values[i]

    def after(self, path: str) -> None:
        for store, attr, original in self.saved.pop(path, []):
            store[attr] = original

    def install(self) -> list:
        handles = []
        for path in self.slots:
            module = self.model.get_submodule(path)
            handles.append(module.register_forward_pre_hook(lambda m, a, p=path: self.before(p)))
            handles.append(module.register_forward_hook(lambda m, a, o, p=path: self.after(p)))
        return handles


def streamed(view: GlobalView, model: nn.Module, fields: Sequence[FieldSpec], layouts: Mapping[str, Layout],
             current: Mapping[int, torch.Tensor], owners: Mapping[str, torch.Tensor], shared_local: bool
             ) -> contextlib.AbstractContextManager[nn.Module]:
    """``model`` whose modules are gathered one at a time around their forwards (module docstring)."""

    @contextlib.contextmanager
    def context() -> Iterator[nn.Module]:
        streamer = _Streamer(view, model, fields, layouts, current, owners, shared_local)
        handles = streamer.install()
        try:
            yield model
        finally:
            for h in handles:
                h.remove()
            for path in list(streamer.saved):
                streamer.after(path)

    return context()


__all__ = ["Contribution", "GatherPlan", "GlobalView", "Part", "streamed"]
