"""IST (Yuan et al., arXiv 1910.02120, Sec. 3): neuron-wise decomposition of MLPs.

Every round the neurons of each hidden layer are split into S disjoint equal parts.
Subnet ``s`` keeps rows ``idx_s(l)`` of the layer into hidden layer ``l`` and columns
``idx_s(l-1)`` of the layer out of ``l-1``; a middle layer keeps the block
``[idx_s(l), idx_s(l-1)]``. Input and output dimensions are never split. Norm layers
on a hidden layer (BatchNorm1d, LayerNorm) are cut with it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..tensors import Piece
from .base import Assignment, Decomposition, check_num_subnets
from .sampling import split_assignment
from .scaling import Scaling
from .trace import default_example_input, get_module, set_module, trace_model

_NORMS = (nn.BatchNorm1d, nn.LayerNorm)


def find_mlp_layers(model: nn.Module, example_input: torch.Tensor | None = None) -> tuple[list[str], dict[str, int]]:
    """Linear layers in execution order, and the hidden layer each norm layer normalises.

    Raises ``ValueError`` when the model is not a chain of Linear layers with only norms,
    activations and dropout between them.
    """
    x = default_example_input(model) if example_input is None else example_input
    trace = trace_model(model, x)
    linears: list[str] = []
    norms: dict[str, int] = {}
    for name in trace.leaf_order:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            linears.append(name)
        elif isinstance(module, _NORMS) and linears:
            norms[name] = len(linears) - 1
        else:
            raise ValueError(
                f"IST's MLP decomposition supports Linear layers with BatchNorm1d/LayerNorm, "
                f"activations and dropout between them; {name!r} is a {type(module).__name__}. "
                "Use decomposition='resist' for residual networks"
            )
    if len(linears) < 2:
        raise ValueError(
            f"{type(model).__name__} has {len(linears)} Linear layer(s); IST needs at least one "
            "hidden layer (two Linear layers) to split"
        )
    layers = [model.get_submodule(n) for n in linears]
    for a, b in zip(layers, layers[1:]):
        if a.out_features != b.in_features:
            raise ValueError(f"Linear layers {linears} do not chain ({a.out_features} -> {b.in_features})")
    last = len(linears) - 1
    norms = {n: l for n, l in norms.items() if l < last}
    return linears, norms


class MLPDecomposition(Decomposition):
    """IST over the hidden neurons of an MLP; subnet width is exactly ``H/S``."""

    def __init__(
        self,
        model: nn.Module,
        num_subnets: int,
        *,
        seed: int = 0,
        eval_scaling: bool = True,
        example_input: torch.Tensor | None = None,
    ) -> None:
        check_num_subnets(num_subnets)
        self.model = model
        self.num_subnets = num_subnets
        self.seed = seed
        self.eval_scaling = eval_scaling
        self.linears, self.norms = find_mlp_layers(model, example_input)
        self.widths = {n: model.get_submodule(n).out_features for n in self.linears[:-1]}
        for name, width in self.widths.items():
            if width % num_subnets:
                ok = [d for d in range(1, width + 1) if width % d == 0 and d <= 64]
                raise ValueError(
                    f"hidden layer {name!r} has width {width}, not divisible by num_subnets="
                    f"{num_subnets}; IST subnets have equal widths. Use num_subnets in {ok} or "
                    f"a width divisible by {num_subnets}"
                )

    @property
    def groups(self) -> dict[str, int]:
        return dict(self.widths)

    def draw(self, round_: int) -> Assignment:
        return split_assignment(self.widths, self.num_subnets, self.seed, round_)

    def build_subnet(self, subnet: int) -> nn.Module:
        sub = copy.deepcopy(self.model)
        S, last = self.num_subnets, len(self.linears) - 1
        for l, name in enumerate(self.linears):
            old = get_module(self.model, name)
            in_f = old.in_features // S if l > 0 else old.in_features
            out_f = old.out_features // S if l < last else old.out_features
            new = nn.Linear(in_f, out_f, bias=old.bias is not None, dtype=old.weight.dtype, device=old.weight.device)
            set_module(sub, name, new)
        for name, l in self.norms.items():
            old = get_module(self.model, name)
            width = self.widths[self.linears[l]] // S
            like = next(old.parameters(), next(old.buffers(), torch.empty(0)))
            device, dtype = like.device, like.dtype
            if isinstance(old, nn.BatchNorm1d):
                new = nn.BatchNorm1d(width, eps=old.eps, momentum=old.momentum, affine=old.affine,
                                     track_running_stats=old.track_running_stats, device=device, dtype=dtype)
            else:
                new = nn.LayerNorm(width, eps=old.eps, elementwise_affine=old.elementwise_affine,
                                   bias=getattr(old, "bias", None) is not None, device=device, dtype=dtype)
            set_module(sub, name, new)
        return sub

    def pieces(self, assignment: Assignment, subnet: int) -> list[Piece]:
        held = {g: torch.tensor(idx, dtype=torch.long) for g, idx in assignment.units[subnet].items()}
        last = len(self.linears) - 1
        hidden = {name: held[name] for name in self.linears[:-1]}
        cut: dict[str, tuple[torch.Tensor | None, ...]] = {}
        for l, name in enumerate(self.linears):
            rows = hidden[name] if l < last else None
            cols = hidden[self.linears[l - 1]] if l > 0 else None
            cut[f"{name}.weight"] = (rows, cols)
            cut[f"{name}.bias"] = (rows,)
        for name, l in self.norms.items():
            for t in ("weight", "bias", "running_mean", "running_var"):
                cut[f"{name}.{t}"] = (hidden[self.linears[l]],)
        out = []
        for name in self.tensor_names:
            index = cut.get(name)
            if index is not None and all(i is None for i in index):
                index = None
            out.append(Piece(name, name, index))
        return out

    def shared_names(self) -> set[str]:
        return {p.global_name for p in self.pieces(self.assignment(0), 0) if p.index is None}

    def eval_scalings(self) -> list[Scaling]:
        """Inputs of every Linear after the first (their inputs were cut) by ``1/S``."""
        if not self.eval_scaling or self.num_subnets == 1:
            return []
        return [(n, 1.0 / self.num_subnets, "in") for n in self.linears[1:]]
