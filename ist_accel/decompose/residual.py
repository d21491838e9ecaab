"""ResIST (Dun et al., arXiv 2107.00961): layer-wise decomposition of residual stacks.

A *stage* is a container (``nn.Sequential``) whose children run one after another;
its *partitionable blocks* are the children whose input and output shapes match,
whose tensors have identical names and shapes, and which are residual: with the last
parameterised layer of the branch silenced, the block returns its input (or its
ReLU). Detection is structural (a traced forward pass), not by class names.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .base import (Assignment, Decomposition, Piece, Scaling, check_num_subnets, evaluation_view, scaling_hooks,
                   state_tensors)
from .sampling import blocks_per_subnet, deal_blocks
from .trace import Trace, default_example_input, get_module, set_module, signature, trace_model


@dataclass(frozen=True)
class ResidualStage:
    """Blocks ``start .. stop-1`` of container ``path`` are interchangeable residual blocks.

    ``branch`` is the block-relative name of the module whose output is the residual
    branch (scaled in the evaluation view); several, comma-separated, for blocks with
    more than one branch (a transformer layer's attention and MLP).
    """

    path: str
    start: int
    stop: int
    branch: str

    @property
    def num_blocks(self) -> int:
        return self.stop - self.start

    def block_name(self, position: int) -> str:
        return f"{self.path}.{position}" if self.path else str(position)


def find_residual_stages(model: nn.Module, example_input: torch.Tensor | None = None) -> list[ResidualStage]:
    """Every run of interchangeable residual blocks in ``model``, in module order.

    A run may start at a stage's first child; policies decide whether it is shared.
    """
    x = default_example_input(model) if example_input is None else example_input
    trace = trace_model(model, x)
    stages = []
    for path, container in model.named_modules():
        if not isinstance(container, (nn.Sequential, nn.ModuleList)) or len(container) < 2:
            continue
        names = [f"{path}.{i}" if path else str(i) for i in range(len(container))]
        if not _runs_in_sequence(trace, names):
            continue
        flags = [_residual_branch(trace, container[i], names[i]) for i in range(len(container))]
        sigs = [signature(c) for c in container]
        i = 0
        while i < len(container):
            if flags[i] is None:
                i += 1
                continue
            j = i + 1
            while j < len(container) and flags[j] == flags[i] and sigs[j] == sigs[i]:
                j += 1
            if j - i >= 1:
                stages.append(ResidualStage(path, i, j, flags[i]))
            i = j
    return stages


def _runs_in_sequence(trace: Trace, names: list[str]) -> bool:
    """Each child ran once, in order, and fed its output straight into the next."""
    calls = [trace.calls.get(n) for n in names]
    if any(c is None or c.calls != 1 for c in calls):
        return False
    return all(
        b.order > a.order and b.input_id == a.output_id for a, b in zip(calls, calls[1:])
    )


def _residual_branch(trace: Trace, block: nn.Module, name: str) -> str | None:
    """The branch-output module of ``block`` if it is a shape-keeping residual block."""
    call = trace.calls[name]
    x, y = call.input, call.output
    if x is None or not isinstance(y, torch.Tensor) or x.shape != y.shape:
        return None
    leaves = trace.leaves_under(name)
    if not leaves:
        return None
    branch = leaves[-1][len(name) + 1 :]
    if x.is_meta:  # a meta-device model: check a materialized copy of the block on real values
        from ..init import materialize

        block = materialize(block, seed=0)
        x = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    silenced = block.get_submodule(branch)
    handle = silenced.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    was_training = block.training
    block.eval()
    try:
        with torch.no_grad():
            y0 = block(x.clone())
    finally:
        handle.remove()
        block.train(was_training)
    if torch.allclose(y0, x, atol=1e-6) or torch.allclose(y0, torch.relu(x), atol=1e-6):
        return branch
    return None


STAGE_SPEC = re.compile(r"^(?P<path>[\w.]+?)(?::(?P<a>\d+)(?:-(?P<b>\d+))?)?$")


def select_stages(
    model: nn.Module, detected: list[ResidualStage], stages: str
) -> list[ResidualStage]:
    """Apply the ``stages`` policy: ``longest``, ``all`` or ``path[:a-b],...``."""
    first_excluded = [
        ResidualStage(s.path, max(s.start, 1), s.stop, s.branch) for s in detected if s.stop > max(s.start, 1)
    ]
    supported = (
        "ResIST needs a container (nn.Sequential or nn.ModuleList) of residual blocks whose "
        "input and output shapes match (torchvision/timm ResNets, ist_accel's pre-activation "
        "ResNets); pass stages='<container>:<first>-<last>' to choose blocks, or use "
        "decomposition='ist_mlp' for MLPs"
    )
    if not first_excluded and stages in ("longest", "all"):
        found = ", ".join(f"{s.path}[{s.start}:{s.stop}]" for s in detected) or "none"
        raise ValueError(
            f"no partitionable residual stack found in {type(model).__name__} "
            f"(runs of identical residual blocks found: {found}). {supported}"
        )
    if stages == "longest":
        longest = max(s.num_blocks for s in first_excluded)
        return [[s for s in first_excluded if s.num_blocks == longest][-1]]
    if stages == "all":
        return first_excluded
    chosen = []
    for spec in (p.strip() for p in stages.split(",") if p.strip()):
        m = STAGE_SPEC.match(spec)
        if not m:
            raise ValueError(f"bad stage spec {spec!r}: expected 'path' or 'path:first-last' (e.g. 'layer3:1-22')")
        path = m["path"]
        runs = [s for s in detected if s.path == path]
        if not runs:
            avail = ", ".join(f"{s.path}:{s.start}-{s.stop - 1}" for s in detected) or "none"
            raise ValueError(f"stage {path!r} holds no partitionable residual blocks; available: {avail}. {supported}")
        if m["a"] is None:
            run = max(runs, key=lambda s: s.num_blocks)
            start = max(run.start, 1)
            if start >= run.stop:
                raise ValueError(f"stage {path!r} has no partitionable block after its first")
            chosen.append(ResidualStage(path, start, run.stop, run.branch))
            continue
        a = int(m["a"])
        b = int(m["b"]) if m["b"] is not None else a
        run = next((s for s in runs if s.start <= a and b < s.stop and a <= b), None)
        if run is None:
            avail = ", ".join(f"{s.path}:{s.start}-{s.stop - 1}" for s in runs)
            raise ValueError(
                f"blocks {a}-{b} of stage {path!r} are not a run of interchangeable residual "
                f"blocks; partitionable there: {avail}"
            )
        chosen.append(ResidualStage(path, a, b + 1, run.branch))
    paths = [s.path for s in chosen]
    if len(set(paths)) != len(paths):
        raise ValueError(f"stage listed twice in {stages!r}")
    return chosen


class ResidualDecomposition(Decomposition):
    """ResIST over one or more residual stages (paper default: the longest stage
    without its first block). Subnet ``s`` holds ``max(floor(N/S), m)`` blocks of each
    stage (leftovers to the first subnets), in their original order; a block it does
    not hold is the identity, i.e. absent from the physically smaller subnet.
    """

    def __init__(
        self,
        model: nn.Module,
        num_subnets: int,
        *,
        min_blocks: int = 0,
        stages: str | list[ResidualStage] = "longest",
        seed: int = 0,
        eval_scaling: bool = True,
        example_input: torch.Tensor | None = None,
    ) -> None:
        check_num_subnets(num_subnets)
        if isinstance(min_blocks, bool) or not isinstance(min_blocks, int) or min_blocks < 0:
            raise ValueError(f"min_blocks must be an integer >= 0, got {min_blocks!r}")
        self.model = model
        self.num_subnets = num_subnets
        self.min_blocks = min_blocks
        self.seed = seed
        self.eval_scaling = eval_scaling
        if isinstance(stages, str):
            self.stages = select_stages(model, find_residual_stages(model, example_input), stages)
        else:  # chosen by the caller (e.g. a transformer's layer list, from its structure)
            self.stages = list(stages)
        for st in self.stages:
            n = st.num_blocks
            if min_blocks > n:
                raise ValueError(
                    f"min_blocks={min_blocks} exceeds the {n} partitionable blocks of stage "
                    f"{st.path!r} (blocks {st.start}-{st.stop - 1}); use min_blocks <= {n}"
                )
            if num_subnets > n and min_blocks == 0:
                raise ValueError(
                    f"num_subnets={num_subnets} exceeds the {n} partitionable blocks of stage "
                    f"{st.path!r} (blocks {st.start}-{st.stop - 1}): a subnet would get none. "
                    f"Use num_subnets <= {n}, set min_blocks >= 1 (blocks then repeat across "
                    "subnets), or partition more blocks (stages='all' or an explicit list)"
                )
        self.depths = {
            st.path: blocks_per_subnet(st.num_blocks, num_subnets, min_blocks) for st in self.stages
        }
        self._shared = {n for n in state_tensors(model) if not self._is_partitioned(n)}

    # ---- Decomposition API --------------------------------------------------

    @property
    def groups(self) -> dict[str, int]:
        return {st.path: st.num_blocks for st in self.stages}

    def assignment(self, round_: int) -> Assignment:
        per_stage = {
            st.path: deal_blocks(st.num_blocks, self.num_subnets, self.min_blocks, self.seed, round_, st.path)
            for st in self.stages
        }
        return Assignment(
            round_, tuple({p: per_stage[p][s] for p in per_stage} for s in range(self.num_subnets))
        )

    def build_subnet(self, subnet: int) -> nn.Module:
        """A copy of the model whose partitioned runs hold ``k_s`` block slots each (the
        partitioned blocks themselves are never copied: slots are refilled per round)."""
        originals = {st.path: get_module(self.model, st.path) for st in self.stages}
        if "" in originals:  # the model itself is the stage container
            return self._rebuilt_stage(self.stages[0], originals[""], subnet)
        try:
            for st in self.stages:
                set_module(self.model, st.path, nn.Sequential())
            sub = copy.deepcopy(self.model)
        finally:
            for path, container in originals.items():
                set_module(self.model, path, container)
        for st in self.stages:
            set_module(sub, st.path, self._rebuilt_stage(st, originals[st.path], subnet))
        return sub

    def _rebuilt_stage(self, st: ResidualStage, container: nn.Module, subnet: int) -> nn.Module:
        children = list(container)
        slots = [copy.deepcopy(children[st.start]) for _ in range(self.depths[st.path][subnet])]
        kept = [copy.deepcopy(c) for c in children[: st.start]] + slots
        kept += [copy.deepcopy(c) for c in children[st.stop :]]
        return nn.ModuleList(kept) if isinstance(container, nn.ModuleList) else nn.Sequential(*kept)

    def pieces(self, assignment: Assignment, subnet: int) -> list[Piece]:
        held = assignment.units[subnet]
        out = []
        for name in self.tensor_names:
            where = self._locate(name)
            if where is None:
                out.append(Piece(name, name))
                continue
            st, position, rest = where
            k = self.depths[st.path][subnet]
            if st.start <= position < st.stop:
                relative = position - st.start
                if relative in held[st.path]:
                    slot = held[st.path].index(relative)
                    out.append(Piece(f"{st.block_name(st.start + slot)}.{rest}", name))
            elif position < st.start:
                out.append(Piece(name, name))
            else:
                out.append(Piece(f"{st.block_name(position - st.num_blocks + k)}.{rest}", name))
        return out

    def shared_names(self) -> set[str]:
        return set(self._shared)

    def eval_scale(self, stage: ResidualStage) -> float:
        """ResIST's evaluation scaling of partitioned residual branches: ``max(1/S, m/N)``."""
        return max(1.0 / self.num_subnets, self.min_blocks / stage.num_blocks)

    @contextlib.contextmanager
    def eval_view(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        model = self.model if model is None else model
        with evaluation_view(model, scaling_hooks(model, self.eval_scalings())) as view:
            yield view

    def eval_scalings(self) -> list[Scaling]:
        """The output of every partitioned block's residual branch by ``max(1/S, m/N)``."""
        out: list[Scaling] = []
        if self.eval_scaling:
            for st in self.stages:
                factor = self.eval_scale(st)
                for position in range(st.start, st.stop):
                    for branch in st.branch.split(","):  # a transformer layer has two residual branches
                        out.append((f"{st.block_name(position)}.{branch}", factor, "out"))
        return out

    # ---- helpers ------------------------------------------------------------

    def _locate(self, name: str) -> tuple[ResidualStage, int, str] | None:
        """(stage, child position, rest of the name) for a tensor inside a partitioned
        stage's container; ``None`` for tensors outside every such container."""
        found = self.__dict__.setdefault("_located", {})
        if name not in found:
            found[name] = self._find(name)
        return found[name]

    def _find(self, name: str) -> tuple[ResidualStage, int, str] | None:
        for st in self.stages:
            prefix = f"{st.path}." if st.path else ""
            position, _, rest = name[len(prefix) :].partition(".")
            if name.startswith(prefix) and position.isdigit():
                return st, int(position), rest
        return None

    def _is_partitioned(self, name: str) -> bool:
        where = self._locate(name)
        return where is not None and where[0].start <= where[1] < where[0].stop
