"""The global model written by the ranks that hold its pieces, never put together on one.

Each subnet group's leader writes one ``safetensors`` shard, ``model-0000g-of-0000S.safetensors``,
with the tensors assigned to it (balanced by size, the same assignment on every rank); it
receives only the pieces of those tensors that other groups hold (one gather per group of
tensors of at most ``budget`` bytes), so no rank holds more than about ``1/S`` of the model
plus one batch. Rank 0 writes ``model.safetensors.index.json`` in the Hugging Face layout,
so ``from_pretrained`` and :func:`load_folder` read the folder. ``export=True`` folds the
evaluation view into the weights (:meth:`Decomposition.export_factors`), as an exported model
must; checkpoints keep the raw training values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import checkpoint
from .gather_plan import GatherPlan
from .subnet import integer_buffer_copies

if TYPE_CHECKING:
    from .round import IST

INDEX = "model.safetensors.index.json"
BUDGET = 256 * 2**20


def shard_name(group: int, num_groups: int) -> str:
    return f"model-{group + 1:05d}-of-{num_groups:05d}.safetensors"


def assign(sizes: list[int], num_groups: int) -> list[list[int]]:
    """Field indices per writer group: largest first to the least-loaded group (ties: the
    lowest group), then in field order within a group."""
    load = [0] * num_groups
    out: list[list[int]] = [[] for _ in range(num_groups)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        g = min(range(num_groups), key=lambda g: (load[g], g))
        out[g].append(i)
        load[g] += sizes[i]
    return [sorted(x) for x in out]


@dataclass
class Shards:
    """What this rank writes: its shard's tensors and name (group leaders), the index (rank 0)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    name: str | None = None
    index: dict | None = None

    def write(self, folder: str | Path) -> Path | None:
        """Write this rank's part into ``folder`` (no communication: a failure here leaves
        no rank waiting)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        if self.name is None and self.index is None:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        if self.index is not None:
            (folder / INDEX).write_text(json.dumps(self.index, indent=1))
        if self.name is None:
            return None
        save_file(self.tensors, str(folder / self.name), metadata={"format": "pt"})
        return folder / self.name


def collect_shards(ist: IST, export: bool = False, budget: int = BUDGET) -> Shards:
    """Every collective of a sharded save (module docstring): each group leader receives the
    pieces of the tensors it writes. Every rank calls it; then each calls :meth:`Shards.write`."""
    top, S = ist.topology, ist.config.num_subnets
    with ist.transport.communication(f"saving the global model at step {ist.steps}"):
        plan, current = ist.read_current()
        persistent = set(ist.model_global.state_dict())
        fields = [i for i, f in enumerate(plan.fields) if f.name in persistent]
        factors = ist.decomposition.export_factors() if export else {}
        writers = assign([plan.fields[i].numel * plan.fields[i].dtype.itemsize for i in fields], S)
        out = Shards(name=shard_name(top.group_index, S) if top.is_leader else None)
        for w, chosen in enumerate(writers):
            writer = top.rank == w * top.G
            for batch in _batches([fields[k] for k in chosen], plan.fields, budget):
                specs = [plan.fields[i] for i in batch]
                sub = GatherPlan(specs, {f.param: ist.layouts[f.param] for f in specs}, S, agreed=plan.agreed)
                gathered = {k: torch.empty(f.shape, dtype=f.dtype, device=ist.device) for k, f in enumerate(specs)} \
                    if writer else {}
                here = {k: current[i] for k, i in enumerate(batch) if i in current}
                ist.global_view.gather(sub, here, ist.exchange.owners.values, gathered, dst=w * top.G)
                for k, f in enumerate(specs) if writer else ():
                    value = gathered[k] * factors[f.name] if f.name in factors else gathered[k]
                    out.tensors[f.name] = value.to(f.dtype).cpu().contiguous()
    if top.rank == 0:  # integer buffers (BatchNorm's num_batches_tracked), as the global model has them
        for name, b in integer_buffer_copies(ist.model_global).items():
            if name in persistent:
                out.tensors[name] = b.cpu()
        weight_map = {plan.fields[i].name: shard_name(w, S) for w, chosen in enumerate(writers)
                      for i in (fields[k] for k in chosen)}
        weight_map.update({n: shard_name(0, S) for n in out.tensors if n not in weight_map})
        total = sum(plan.fields[i].numel * plan.fields[i].dtype.itemsize for i in fields)
        out.index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return out


def save_sharded(ist: IST, folder: str | Path, export: bool = False, budget: int = BUDGET) -> Path | None:
    """Collect and write (module docstring); every rank calls it. All ranks raise alike if
    one failed to write. Returns the shard this rank wrote, or None."""
    shards = collect_shards(ist, export, budget)
    failure: Exception | None = None
    try:
        written = shards.write(folder)
    except Exception as error:  # a full disk, say
        failure, written = error, None
    checkpoint.raise_unless_all_saved(failure, folder, what="writing the sharded model into", exchange=lambda flag:
                                      ist.transport.exchange_small(flag.to(ist.device), "save"))
    return written


def _batches(indices: list[int], fields: list, budget: int) -> list[list[int]]:
    """Consecutive groups of fields of at most ``budget`` bytes (a larger field alone)."""
    out: list[list[int]] = []
    size = budget + 1
    for i in indices:
        n = fields[i].numel * fields[i].dtype.itemsize
        if size + n > budget:
            out.append([])
            size = 0
        out[-1].append(i)
        size += n
    return out


def load_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded folder (the index's shards), or of a single
    ``model.safetensors``, as one state dict."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / INDEX
    if not index.is_file():
        return load_file(str(folder / "model.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(str(folder / shard)))
    return state


__all__ = ["INDEX", "Shards", "assign", "collect_shards", "load_folder", "save_sharded", "shard_name"]
