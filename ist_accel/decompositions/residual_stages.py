"""Finding the residual stages ResIST (Dun et al., arXiv 2107.00961, Sec. 3) partitions.

A *stage* is a container (``nn.Sequential`` or ``nn.ModuleList``) whose children run one
after another; its *partitionable blocks* are the children whose input and output shapes
match, whose tensors have identical names and shapes, and which are residual: with the
last parameterised layer of the branch silenced, the block returns its input (or its
ReLU). Detection is structural (a traced forward pass), not by class names;
:func:`select_stages` applies the user's ``stages`` policy to what was found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..init import materialize
from .trace import Trace, default_example_input, signature, trace_model


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


__all__ = ["STAGE_SPEC", "ResidualStage", "find_residual_stages", "select_stages"]
