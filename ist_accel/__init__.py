"""ist_accel: Independent Subnet Training (IST, ResIST) for the Hugging Face / DeepSpeed stack.

The public names load on first use (PEP 562): ``import ist_accel`` costs a few
milliseconds and imports neither torch, Accelerate, transformers nor DeepSpeed, so the
``ist-accel`` console script and light tools start fast. ``from ist_accel import X``
imports only the submodule that defines ``X``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    "ISTAccelerator": "accelerate",
    "ISTModel": "accelerate",
    "RoundBytes": "accounting",
    "lower_bound": "accounting",
    "ring_allreduce_bytes": "accounting",
    "ISTConfig": "config",
    "CostReport": "cost",
    "cost_report": "cost",
    "Assignment": "decompositions",
    "Decomposition": "decompositions",
    "MLPDecomposition": "decompositions",
    "ResidualDecomposition": "decompositions",
    "decompose": "decompositions",
    "find_residual_stages": "decompositions",
    "CheckpointError": "checkpoint",
    "CheckpointSaveError": "checkpoint",
    "ISTAgreementError": "faults",
    "ISTError": "faults",
    "ISTNonFiniteError": "faults",
    "ISTPeerFailure": "faults",
    "ISTSyncError": "faults",
    "LocalSource": "node_local",
    "local_source": "node_local",
    "prepare_local_loader": "node_local",
    "recompute_batchnorm": "norm_statistics",
    "recomputed_batchnorm": "norm_statistics",
    "check_setup": "preflight",
    "ReferenceIST": "reference",
    "IST": "round",
    "RoundMetrics": "round",
    "SubnetTensors": "subnet",
    "Piece": "tensors",
    "Topology": "topology",
    "TransferPlan": "transfer",
    "build_plan": "transfer",
    "ZeroSubnet": "zero",
    "check_deepspeed_config": "zero",
    "ISTCallback": "trainer",
    "ISTTrainer": "trainer",
    "ISTSeq2SeqTrainer": "trainer",
    "apply": "trainer",
}

__all__ = [
    "Assignment",
    "CheckpointError",
    "CheckpointSaveError",
    "CostReport",
    "Decomposition",
    "IST",
    "ISTAccelerator",
    "ISTAgreementError",
    "ISTCallback",
    "ISTConfig",
    "ISTError",
    "ISTModel",
    "ISTNonFiniteError",
    "ISTPeerFailure",
    "ISTSeq2SeqTrainer",
    "ISTSyncError",
    "ISTTrainer",
    "LocalSource",
    "MLPDecomposition",
    "Piece",
    "ReferenceIST",
    "ResidualDecomposition",
    "RoundBytes",
    "RoundMetrics",
    "SubnetTensors",
    "Topology",
    "TransferPlan",
    "ZeroSubnet",
    "apply",
    "build_plan",
    "check_deepspeed_config",
    "check_setup",
    "cost_report",
    "decompose",
    "find_residual_stages",
    "local_source",
    "lower_bound",
    "prepare_local_loader",
    "recompute_batchnorm",
    "recomputed_batchnorm",
    "ring_allreduce_bytes",
]  # the keys of _EXPORTS (tests/test_imports.py checks)

if TYPE_CHECKING:  # static checkers see the real names; nothing below runs
    from .accelerate import ISTAccelerator, ISTModel
    from .accounting import RoundBytes, lower_bound, ring_allreduce_bytes
    from .checkpoint import CheckpointError, CheckpointSaveError
    from .config import ISTConfig
    from .cost import CostReport, cost_report
    from .decompositions import (
        Assignment,
        Decomposition,
        MLPDecomposition,
        ResidualDecomposition,
        decompose,
        find_residual_stages,
    )
    from .faults import ISTAgreementError, ISTError, ISTNonFiniteError, ISTPeerFailure, ISTSyncError
    from .node_local import LocalSource, local_source, prepare_local_loader
    from .norm_statistics import recompute_batchnorm, recomputed_batchnorm
    from .preflight import check_setup
    from .reference import ReferenceIST
    from .round import IST, RoundMetrics
    from .subnet import SubnetTensors
    from .tensors import Piece
    from .topology import Topology
    from .trainer import ISTCallback, ISTSeq2SeqTrainer, ISTTrainer, apply
    from .transfer import TransferPlan, build_plan
    from .zero import ZeroSubnet, check_deepspeed_config


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # cached: __getattr__ runs once per name
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

