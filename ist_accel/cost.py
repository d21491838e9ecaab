"""The cost report of ``ist-accel plan``: what one IST round costs for a model (sizes,
bytes per worker against the lower bound, memory per rank), before anything runs.

Not to be confused with :class:`~ist_accel.transfer.TransferPlan` (what one group moves in
one round transition, which :func:`rank_memory` builds to size the exchange's buffers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .accounting import FP32_BYTES, lower_bound, ring_allreduce_bytes
from .config import ISTConfig
from .decompositions import Decomposition, decompose
from .tensors import state_tensors
from .transfer import FieldSpec, build_plan, layouts


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank of a subnet group keeps for training (fp32): its subnet's parameters,
    gradients and optimizer state; the owner shards (rows of the global model no subnet
    holds this round); the exchange's reusable buffers; the transfer plans."""

    subnet: int
    owner_shards: int
    buffers: int
    plans: int

    @property
    def total(self) -> int:
        return self.subnet + self.owner_shards + self.buffers + self.plans


def rank_memory(d: Decomposition, config: ISTConfig, optimizer_slots: int = 1, rounds: int = 2) -> list[RankMemory]:
    """What each subnet group's ranks keep (:class:`RankMemory`): the subnet state of round 0
    (``optimizer_slots`` tensors of state per parameter: 1 for SGD with momentum, 2 for
    Adam), the owner shards and buffers at their largest over the first ``rounds`` round
    ends (the engine's buffers grow to the largest round and are reused). An outer optimizer
    adds, per trained element, the round's starting value and (with momentum) the outer
    momentum (:mod:`ist_accel.outer`)."""
    S, G = config.num_subnets, config.group_size
    outer = config.outer()
    outer_slots = 0 if outer.is_plain_average else 1 + outer.has_momentum
    model = d.model
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    fields = [FieldSpec(n, t.shape, t.dtype, frozen=n in frozen) for n, t in state_tensors(model).items()]
    shapes = {f.name: f.shape for f in fields}
    by_round = [layouts(fields, [d.pieces(d.assignment(r), s) for s in range(S)]) for r in range(rounds + 1)]
    out = []
    for s in range(S):
        pieces = d.pieces(d.assignment(0), s)
        values = sum(p.numel(shapes[p.global_name]) for p in pieces)
        trained = sum(p.numel(shapes[p.global_name]) for p in pieces if p.global_name in trainable)
        owners = buffers = plans = 0
        for r in range(rounds):
            plan = build_plan(fields, by_round[r], by_round[r + 1], s, S, r)
            row = {f.name: f.numel // max(f.shape[0], 1) if len(f.shape) else 1 for f in fields}
            owners = max(owners, sum((hi - lo) * row[n] for n, (lo, hi) in plan.owned.items()))
            moved = sum(plan.send_sizes.values()) + -(-sum(plan.recv_sizes.values()) // G) + plan.keep_size
            if G > 1:
                moved += sum(plan.recv_sizes.values())
            biggest_average = max((plan.fields[a.field].numel for a in plan.averages), default=0)
            buffers = max(buffers, (moved + biggest_average) * FP32_BYTES)
            plans = max(plans, plan.nbytes())
        out.append(RankMemory(subnet=(values + trained * (1 + optimizer_slots + outer_slots)) * FP32_BYTES,
                              owner_shards=owners * FP32_BYTES, buffers=buffers, plans=plans))
    return out


@dataclass(frozen=True)
class CostReport:
    """What ``ist-accel plan`` reports for one IST configuration: sizes (parameters),
    bytes per worker (fp32) against LocalSGD and DDP, and memory per rank."""

    model: str
    decomposition: str
    num_subnets: int
    group_size: int
    model_params: int
    shared_params: int
    partitioned_units: int
    subnet_params: list[int]
    subnet_fraction: float
    bytes_per_round_lower: float
    bytes_per_round_lower_per_worker: list[float]
    localsgd_bytes_per_round: float
    ddp_bytes_per_step: float
    rank_memory: list[RankMemory]
    replica_memory: int  # what DDP / LocalSGD keep per worker: the whole model, its gradients, optimizer state

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        mib = 2**20
        rows = [
            ("model params", f"{self.model_params:,}"),
            ("shared params", f"{self.shared_params:,}"),
            ("partitioned units", f"{self.partitioned_units:,}"),
            *(
                (f"subnet {s} params", f"{n:,} ({n / self.model_params:.1%})")
                for s, n in enumerate(self.subnet_params)
            ),
            ("IST bytes/round/worker, lower bound", f"{self.bytes_per_round_lower / mib:,.2f} MiB"),
            ("LocalSGD bytes/round/worker", f"{self.localsgd_bytes_per_round / mib:,.2f} MiB"),
            ("DDP bytes/step/worker", f"{self.ddp_bytes_per_step / mib:,.2f} MiB"),
            *(
                (f"rank memory, subnet {s}", f"{m.total / mib:,.1f} MiB (subnet state {m.subnet / mib:,.1f} + owner "
                 f"shards {m.owner_shards / mib:,.1f} + buffers {m.buffers / mib:,.1f} + plans {m.plans / mib:,.2f})")
                for s, m in enumerate(self.rank_memory)
            ),
            ("DDP / LocalSGD memory per worker", f"{self.replica_memory / mib:,.1f} MiB (model, gradients, "
                                                 "optimizer state)"),
        ]
        head = (
            f"{self.model}: {self.decomposition}, {self.num_subnets} subnets x "
            f"{self.group_size} ranks (fp32)\n\n| quantity | value |\n|---|---|\n"
        )
        return head + "\n".join(f"| {k} | {v} |" for k, v in rows)


def cost_report(model: nn.Module, config: ISTConfig, name: str = "model", rounds: int = 4,
                optimizer_slots: int = 1) -> CostReport:
    """Sizes of ``model`` under ``config``, bytes per worker (the IST bound averaged over the
    first ``rounds`` round transitions) and memory per rank (:func:`rank_memory`). The
    model may be on the meta device."""
    d = decompose(model, config)
    params = dict(model.named_parameters())
    shared = d.shared_names()
    world = config.num_subnets * config.group_size
    model_params = sum(p.numel() for p in params.values())
    per_worker = [0.0] * config.num_subnets
    for r in range(rounds):
        b = lower_bound(d, d.assignment(r), d.assignment(r + 1)).bytes(FP32_BYTES, config.group_size)
        per_worker = [acc + x / rounds for acc, x in zip(per_worker, b.sent)]
    return CostReport(
        model=name,
        decomposition=_kind(d),
        num_subnets=config.num_subnets,
        group_size=config.group_size,
        model_params=model_params,
        shared_params=sum(p.numel() for n, p in params.items() if n in shared),
        partitioned_units=sum(d.groups.values()),
        subnet_params=[d.subnet_numel(s) for s in range(config.num_subnets)],
        subnet_fraction=sum(d.subnet_numel(s) for s in range(config.num_subnets)) / config.num_subnets / model_params,
        bytes_per_round_lower=sum(per_worker) / len(per_worker),
        bytes_per_round_lower_per_worker=per_worker,
        localsgd_bytes_per_round=ring_allreduce_bytes(model_params, world),
        ddp_bytes_per_step=ring_allreduce_bytes(model_params, world),
        rank_memory=rank_memory(d, config, optimizer_slots),
        replica_memory=sum(t.numel() for t in state_tensors(model).values()) * FP32_BYTES
        + sum(p.numel() for p in params.values() if p.requires_grad) * (1 + optimizer_slots) * FP32_BYTES,
    )


def _kind(d: Decomposition) -> str:
    return "ist_mlp" if type(d).__name__ == "MLPDecomposition" else "resist"


__all__ = ["CostReport", "RankMemory", "cost_report", "rank_memory"]
