"""What a subnet is: units, shared set, sampling, subnet build, eval scaling.

Pure torch, no communication: every rank derives the same assignment from the
shared seed and the round number.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ISTConfig
from .base import (Assignment, Decomposition, Piece, average_into_global, keep_frozen, kept_tensors, load_subnet,
                   state_tensors)
from .mlp import MLPDecomposition, find_mlp_layers
from .residual import ResidualDecomposition, ResidualStage, find_residual_stages
from .transformer import TransformerLayerDecomposition, find_layer_stacks, is_transformer
from .transformer_width import TransformerWidthDecomposition
from .sampling import blocks_per_subnet, deal_blocks, split_neurons


def decompose(
    model: nn.Module, config: ISTConfig, example_input: torch.Tensor | None = None
) -> Decomposition:
    """Build the decomposition ``config.decomposition`` names for ``model``.

    ``"auto"`` picks the layer-wise split for a `transformers` model, IST's neuron split
    for a chain of Linear layers, and ResIST otherwise.
    """
    kind = config.decomposition
    if kind == "auto" and is_transformer(model):
        kind = "layers"
    if kind == "auto":
        try:
            find_mlp_layers(model, example_input)
            kind = "ist_mlp"
        except ValueError:
            kind = "resist"
    if kind in ("ffn", "heads"):
        return TransformerWidthDecomposition(model, config.num_subnets, kind, seed=config.seed,
                                             eval_scaling=config.eval_scaling)
    if kind == "layers":
        return TransformerLayerDecomposition(
            model, config.num_subnets, min_blocks=config.min_blocks, stages=config.stages, seed=config.seed,
            eval_scaling=config.eval_scaling,
        )
    if kind == "ist_mlp":
        return MLPDecomposition(
            model, config.num_subnets, seed=config.seed, eval_scaling=config.eval_scaling,
            example_input=example_input,
        )
    return ResidualDecomposition(
        model, config.num_subnets, min_blocks=config.min_blocks, stages=config.stages,
        seed=config.seed, eval_scaling=config.eval_scaling, example_input=example_input,
    )


__all__ = [
    "Assignment", "Decomposition", "MLPDecomposition", "Piece", "ResidualDecomposition",
    "ResidualStage", "TransformerLayerDecomposition", "TransformerWidthDecomposition", "average_into_global", "find_layer_stacks", "is_transformer", "blocks_per_subnet", "deal_blocks", "decompose",
    "find_mlp_layers", "find_residual_stages", "keep_frozen", "kept_tensors", "load_subnet", "split_neurons", "state_tensors",
]
