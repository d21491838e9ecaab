"""ResIST (Dun et al., arXiv 2107.00961): layer-wise decomposition of residual stacks.

Each round the partitionable blocks of every chosen stage (:mod:`.residual_stages`) are
shuffled and dealt to the subnets (Sec. 3); a subnet is a copy of the model whose stages
hold only its blocks' slots, a block it does not hold acting as the identity. The
evaluation view scales every partitioned residual branch by ``max(1/S, m/N)``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..tensors import Piece, state_tensors
from .base import Assignment, Decomposition, check_num_subnets
from .residual_stages import ResidualStage, find_residual_stages, select_stages
from .sampling import blocks_per_subnet, deal_blocks
from .scaling import Scaling
from .trace import get_module, set_module


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

    def draw(self, round_: int) -> Assignment:
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


__all__ = ["ResidualDecomposition"]
