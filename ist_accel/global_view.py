"""The global model, put together from the subnets on demand (for evaluation and saving).

Every element of the global model lives in exactly one place in a round (its holder's
subnet, or, for IST's unheld blocks, its owner shard; :mod:`ist_accel.transfer`); whole
tensors with several holders live in each. What moves (:class:`~ist_accel.gather_plan.GatherPlan`):

* **at a round end** (after a sync or a load, before the first round) the holders agree:
  every rank reads the shared set from its own subnet, and receives from each other group,
  in one batch of messages (in the exchange's wire dtype), only the units and owner rows it
  lacks, each whole tensor from one of its holders. Evaluating the model every round costs each rank what it lacks, once
  (issue 34, item 5: before, the shared set was all-reduced and every group's contribution
  all-gathered, 2.2x the bytes on a ResNet);
* **mid-round** the value is the mean over holders, as a sync would average them: the shared
  set is all-reduced among the groups and divided by S, and each group's contributions are
  packed into one flat fp32 buffer and all-gathered (or sent to one rank, ``dst``).

Either way this is exactly the model a sync now would produce; at a round end it is the
averaged global model (IST Alg. 1's evaluation of the global network).

:meth:`GlobalView.streamed` never builds the whole model: each module that owns tensors is
gathered just before its forward and dropped after it (as FSDP and ZeRO-3 do), so a rank
holds at most one module of the global model at a time. Every rank must run the same
forwards (an evaluation loop over evenly sharded data does). At a round end a module whose
tensors are all shared is read straight from this rank's subnet: nothing moves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
import torch
from torch import nn

from .gather_plan import Contribution, GatherPlan
from .topology import Topology
from .transfer import FieldSpec, Layout, read_box, write_box
from .transport import Transport


class GlobalView:
    """Gathers the global model into ``model``'s tensors (module docstring)."""

    def __init__(self, topology: Topology, transport: Transport, device: torch.device,
                 values: torch.dtype = torch.float32, wire: torch.dtype | None = None) -> None:
        self.topology, self.transport, self.device = topology, transport, device
        self.values = values  # the dtype contributions are summed in (and travel in mid-round)
        self.wire = wire or values  # the dtype a round end's messages travel in (the exchange's)
        self._plans: dict[tuple[int, bool], GatherPlan] = {}

    def plan(self, round_: int, fields: Sequence[FieldSpec], layouts: Mapping[str, Layout],
             agreed: bool = False) -> GatherPlan:
        key = (round_, agreed)
        if key not in self._plans:
            self._plans = {k: v for k, v in self._plans.items() if k[0] == round_}
            self._plans[key] = GatherPlan(fields, layouts, self.topology.S, agreed)
        return self._plans[key]

    def gather(self, plan: GatherPlan, current: Mapping[int, torch.Tensor], owners: Mapping[str, torch.Tensor],
               out: Mapping[int, torch.Tensor], dst: int | None = None, lossy: bool = False) -> bool:
        """Fill ``out[i]`` (global-shaped tensors of every field) on every rank (``dst=None``)
        or on rank ``dst`` only; ``current`` are this group's subnet tensors, ``owners`` its
        owner shards. Returns whether this rank received the model. ``lossy`` (an evaluation's
        read): at a round end the pieces travel in the exchange's wire dtype; else exactly."""
        top, S = self.topology, self.topology.S
        if dst is not None and dst % top.G:
            raise ValueError(f"gather to rank {dst}: the destination must lead its group (a multiple of G={top.G})")
        if dst is not None and not top.is_leader:
            return False  # the leaders carry their groups' contributions
        if plan.agreed:
            return self._gather_agreed(plan, current, owners, out, dst, self.wire if lossy else self.values)
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


    def _pack(self, c: Contribution, plan: GatherPlan, current: Mapping[int, torch.Tensor],
              owners: Mapping[str, torch.Tensor]) -> torch.Tensor:
        chunk = torch.empty(c.size, dtype=self.values, device=self.device)
        for part in c.parts:
            source = current[part.field] if part.store == "sub" else owners[plan.fields[part.field].name]
            read_box(source, part.rows, part.cols, chunk[part.offset : part.offset + part.numel].view(part.shape))
        for i, offset, n in c.wholes:
            chunk[offset : offset + n].copy_(current[i].reshape(-1))
        return chunk

    @staticmethod
    def _write(c: Contribution, chunk: torch.Tensor, out: Mapping[int, torch.Tensor]) -> None:
        for part in c.parts:
            write_box(out[part.field], part.at_rows, part.at_cols,
                      chunk[part.offset : part.offset + part.numel].view(part.shape))
        for i, offset, n in c.wholes:
            out[i].copy_(chunk[offset : offset + n].view(out[i].shape))

    def _gather_agreed(self, plan: GatherPlan, current: Mapping[int, torch.Tensor],
                       owners: Mapping[str, torch.Tensor], out: Mapping[int, torch.Tensor], dst: int | None,
                       wire: torch.dtype) -> bool:
        """:meth:`gather` when the holders agree (:class:`GatherPlan`): one batch of messages,
        each carrying from one group to another only what the receiver lacks."""
        top, me = self.topology, self.topology.group_index
        receivers = range(top.S) if dst is None else [dst // top.G]
        sends = {top.peer(q): self._pack(plan.needs[me, q], plan, current, owners).to(wire)
                 for q in receivers if q != me and plan.needs[me, q].size}
        receiving = me in receivers and (dst is None or top.rank == dst)
        recvs = {top.peer(g): torch.empty(plan.needs[g, me].size, dtype=wire, device=self.device)
                 for g in range(top.S) if receiving and g != me and plan.needs[g, me].size}
        self.transport.point_to_point(sends, recvs, "gather")
        if not receiving:
            return False
        with torch.no_grad():
            self._write(plan.own[me], self._pack(plan.own[me], plan, current, owners), out)
            for g in range(top.S):
                if top.peer(g) in recvs:
                    self._write(plan.needs[g, me], recvs[top.peer(g)].to(self.values), out)
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
                plan = self.plans[path] = GatherPlan(fields, layouts, self.view.topology.S, self.shared_local)
            out = {k: torch.empty(f.shape, dtype=f.dtype, device=self.view.device) for k, f in enumerate(fields)}
            current = {k: self.current[i] for k, i in enumerate(picked) if i in self.current}
            self.view.gather(plan, current, self.owners, out, dst=None, lossy=True)  # (evaluation only)
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


__all__ = ["GlobalView", "streamed"]
