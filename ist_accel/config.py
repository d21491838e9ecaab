"""`ISTConfig`: every knob of independent subnet training, validated where it is built.

An ``ISTConfig`` checks itself when constructed and cannot be changed afterwards (a frozen
dataclass; ``dataclasses.replace`` makes a checked copy), so code that receives one never
validates it again. Validation here is model-free (types and ranges); checks that need the model
(enough blocks for the subnets, splittable widths) live in the decompositions and
run before any process group or file is touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .outer import OuterSGD

DECOMPOSITIONS = ("auto", "resist", "ist_mlp", "layers", "ffn", "heads")
OPTIMIZER_STATE_POLICIES = ("reset", "carry", "local")
WIRE_DTYPES = ("fp32", "bf16", "fp16", "fp64", "int8", "int4", "fp8")
NONFINITE_POLICIES = ("raise", "skip")
GLOBAL_VIEWS = ("auto", "gather", "stream")
ASSIGNMENTS = ("random", "rotate")


@dataclass(frozen=True)
class ISTConfig:
    """Configuration of an IST / ResIST run.

    Args:
        num_subnets: S, the number of subnets (groups of ranks) per round.
        local_steps: optimizer steps between two synchronizations (a round).
        min_blocks: ResIST minimum subnet depth m per partitioned stage (0: none).
            Where ``S * m`` exceeds the stage's blocks, blocks repeat across subnets.
        decomposition: ``"resist"`` (residual blocks, arXiv 2107.00961),
            ``"ist_mlp"`` (hidden neurons, arXiv 1910.02120), ``"layers"`` (ResIST over a
            `transformers` model's layer list), ``"ffn"`` / ``"heads"`` (IST over every
            layer's FFN neurons / attention heads) or ``"auto"``.
        stages: ResIST stages to partition: ``"longest"`` (the paper: the longest
            stage without its first block), ``"all"``, or an explicit override such
            as ``"layer3"`` or ``"layer2:1-3,layer3:1-22"`` (container path, block range).
        assignment: ``"random"`` (the papers: a fresh random decomposition every round) or
            ``"rotate"`` (a random split drawn every S rounds whose parts move on by one
            subnet each round: every unit visits every subnet, and so every node's data,
            once per S rounds; for data that differ between nodes; needs as many units of
            each group in every subnet).
        optimizer_state: ``"reset"`` (the papers: fresh state each round),
            ``"carry"`` (state travels with its unit, averaged over holders) or
            ``"local"`` (a group keeps its state for every tensor it holds again next
            round, the shared set always: rank-local like LocalSGD's; no extra bytes;
            not under DeepSpeed).
        group_size: G, ranks training one subnet together (data parallel inside).
        seed: shared seed; the assignment of round r is a pure function of (seed, r).
        eval_scaling: scale partitioned units in the evaluation view (ResIST: the
            residual branch by ``max(1/S, m/N)``; IST: inputs of cut layers by ``1/S``).
        wire_dtype: dtype on the wire for the exchange and for reads of the global model at a
            round end (``"fp64"`` for float64 models, as exact checks use); master values stay
            in the model's dtype, averaged in fp32 (float64 for a float64 model). ``"int8"``,
            ``"int4"`` and ``"fp8"`` (e4m3) quantize the exchange: codes with one fp32 scale per
            block of ``wire_block`` elements, rounded stochastically (:mod:`ist_accel.wire_codec`);
            an evaluation's reads then travel in bf16.
        wire_block: elements per scale of a quantized wire (ignored by the others).
        nonfinite: a subnet whose update holds NaN/Inf at sync: ``"raise"`` on every
            rank, or ``"skip"`` (drop that group's update of the round, warn; keeps a copy
            of the round's starting subnet).
        sync_timeout: seconds a collective may wait for a peer before the run fails
            (every process group: the engine's, and under ISTAccelerator / ISTTrainer the
            default one, however it was created).
        global_view: how evaluation reads the global model: ``"gather"`` (whole, on every
            rank), ``"stream"`` (one module at a time, gathered around its forward: no rank
            ever holds the whole model) or ``"auto"`` (stream when the model was built on
            the meta device).
        outer_lr, outer_momentum, outer_nesterov: the outer optimizer of a round (DiLoCo,
            arXiv 2311.08105; :mod:`ist_accel.outer`): each unit moves by SGD over its
            pseudo-gradient ``before - mean over holders(after)``. The default ``1, 0, False``
            is plain averaging (the papers); DiLoCo's is ``0.7, 0.9, True``. With momentum,
            the outer momentum travels with its unit (one more field per trained parameter).
    """

    num_subnets: int = 2
    local_steps: int = 50
    min_blocks: int = 0
    decomposition: str = "auto"
    stages: str = "longest"
    optimizer_state: str = "reset"
    group_size: int = 1
    seed: int = 0
    eval_scaling: bool = True
    wire_dtype: str = "fp32"
    wire_block: int = 64
    nonfinite: str = "raise"
    sync_timeout: float = 600.0
    global_view: str = "auto"
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    outer_nesterov: bool = False
    assignment: str = "random"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and what is accepted."""
        _check_int("num_subnets", self.num_subnets, minimum=1)
        _check_int("local_steps", self.local_steps, minimum=1)
        _check_int("min_blocks", self.min_blocks, minimum=0)
        _check_int("group_size", self.group_size, minimum=1)
        _check_int("wire_block", self.wire_block, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_choice("decomposition", self.decomposition, DECOMPOSITIONS)
        _check_choice("optimizer_state", self.optimizer_state, OPTIMIZER_STATE_POLICIES)
        _check_choice("wire_dtype", self.wire_dtype, WIRE_DTYPES)
        _check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        _check_choice("global_view", self.global_view, GLOBAL_VIEWS)
        _check_choice("assignment", self.assignment, ASSIGNMENTS)
        if isinstance(self.sync_timeout, bool) or not isinstance(self.sync_timeout, (int, float)) \
                or not math.isfinite(self.sync_timeout) or not self.sync_timeout > 0:
            raise ValueError(f"sync_timeout must be a finite number of seconds > 0, got {self.sync_timeout!r}")
        if not isinstance(self.eval_scaling, bool):
            raise ValueError(f"eval_scaling must be True or False, got {self.eval_scaling!r}")
        if not _is_number(self.outer_lr) or not self.outer_lr > 0:
            raise ValueError(f"outer_lr must be a finite number > 0 (1.0: plain averaging), got {self.outer_lr!r}")
        if not _is_number(self.outer_momentum) or not 0 <= self.outer_momentum < 1:
            raise ValueError(f"outer_momentum must be a number in [0, 1) (0: none), got {self.outer_momentum!r}")
        if not isinstance(self.outer_nesterov, bool):
            raise ValueError(f"outer_nesterov must be True or False, got {self.outer_nesterov!r}")
        if self.outer_nesterov and self.outer_momentum == 0:
            raise ValueError("outer_nesterov=True needs outer_momentum > 0 (DiLoCo: 0.9)")
        if not isinstance(self.stages, str) or not self.stages.strip():
            raise ValueError(
                f"stages must be 'longest', 'all' or a list like 'layer3:1-22', got {self.stages!r}"
            )

    def check_world_size(self, world_size: int) -> None:
        """World = S subnet groups x G ranks; raise if ``world_size`` does not fit."""
        expected = self.num_subnets * self.group_size
        if world_size != expected:
            raise ValueError(
                f"world size {world_size} does not fit num_subnets={self.num_subnets} x "
                f"group_size={self.group_size} = {expected}; launch {expected} processes or "
                f"choose num_subnets x group_size = {world_size}"
            )

    def outer(self) -> "OuterSGD":
        """The round's outer optimizer (:class:`ist_accel.outer.OuterSGD`)."""
        from .outer import OuterSGD

        return OuterSGD(float(self.outer_lr), float(self.outer_momentum), self.outer_nesterov)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A short stable hash of the config, for rank agreement checks."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
