"""ist_accel: Independent Subnet Training (IST, ResIST) for the Hugging Face / DeepSpeed stack."""

from .accelerate import ISTAccelerator, ISTModel
from .accounting import RoundBytes, lower_bound, ring_allreduce_bytes
from .config import ISTConfig
from .decompose import (
    Assignment,
    Decomposition,
    MLPDecomposition,
    Piece,
    ResidualDecomposition,
    decompose,
    find_residual_stages,
)
from .checkpoint import CheckpointError, CheckpointSaveError
from .faults import ISTAgreementError, ISTError, ISTNonFiniteError, ISTPeerFailure, ISTSyncError
from .plan import Plan, make_plan
from .preflight import check_setup
from .reference import ReferenceIST
from .round import IST, RoundMetrics
from .subnet import SubnetTensors
from .topology import Topology
from .transfer import TransferPlan, build_plan
from .zero import ZeroSubnet, check_deepspeed_config

__version__ = "0.1.0"

__all__ = [
    "Assignment",
    "CheckpointError",
    "CheckpointSaveError",
    "Decomposition",
    "IST",
    "ISTAccelerator",
    "ISTAgreementError",
    "ISTConfig",
    "ISTError",
    "ISTModel",
    "ISTNonFiniteError",
    "ISTPeerFailure",
    "ISTSyncError",
    "MLPDecomposition",
    "Piece",
    "Plan",
    "ReferenceIST",
    "ResidualDecomposition",
    "RoundMetrics",
    "RoundBytes",
    "SubnetTensors",
    "Topology",
    "TransferPlan",
    "ZeroSubnet",
    "check_deepspeed_config",
    "build_plan",
    "check_setup",
    "decompose",
    "find_residual_stages",
    "lower_bound",
    "make_plan",
    "ring_allreduce_bytes",
]
