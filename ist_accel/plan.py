"""`ist-accel plan`: what one IST round costs for a model, before anything runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .accounting import FP32_BYTES, lower_bound, ring_allreduce_bytes
from .config import ISTConfig
from .decompose import Decomposition, decompose


@dataclass(frozen=True)
class Plan:
    """Sizes (parameters) and per-worker bytes (fp32) of one IST configuration."""

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
        ]
        head = (
            f"{self.model}: {self.decomposition}, {self.num_subnets} subnets x "
            f"{self.group_size} ranks (fp32)\n\n| quantity | value |\n|---|---|\n"
        )
        return head + "\n".join(f"| {k} | {v} |" for k, v in rows)


def make_plan(model: nn.Module, config: ISTConfig, name: str = "model", rounds: int = 4) -> Plan:
    """Sizes of ``model`` under ``config`` and bytes per worker, the IST bound averaged
    over the first ``rounds`` round transitions."""
    d = decompose(model, config)
    params = dict(model.named_parameters())
    shared = d.shared_names()
    world = config.num_subnets * config.group_size
    model_params = sum(p.numel() for p in params.values())
    per_worker = [0.0] * config.num_subnets
    for r in range(rounds):
        b = lower_bound(d, d.assignment(r), d.assignment(r + 1)).bytes(FP32_BYTES, config.group_size)
        per_worker = [acc + x / rounds for acc, x in zip(per_worker, b.sent)]
    return Plan(
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
    )


def _kind(d: Decomposition) -> str:
    return "ist_mlp" if type(d).__name__ == "MLPDecomposition" else "resist"
