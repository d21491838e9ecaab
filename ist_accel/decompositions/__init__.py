"""The decompositions: what a subnet is for each model family (IST arXiv 1910.02120:
neurons of an MLP or of a transformer's layers; ResIST arXiv 2107.00961: blocks of a
residual stack or a transformer's layers), and :func:`decompose`, which picks one.

Pure torch, no communication: every rank derives the same assignment from the shared
seed and the round number. The tensor-level names (:class:`~ist_accel.tensors.Piece`,
:func:`~ist_accel.tensors.state_tensors`) live in the leaf module :mod:`ist_accel.tensors`
and are re-exported here.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ISTConfig
from ..tensors import Piece, state_tensors
from .base import Assignment, Decomposition
from .mlp import MLPDecomposition, find_mlp_layers
from .pieces import average_into_global, keep_frozen, kept_tensors, load_subnet
from .residual import ResidualDecomposition
from .residual_stages import ResidualStage, find_residual_stages
from .sampling import blocks_per_subnet, deal_blocks, split_neurons
from .transformer import TransformerLayerDecomposition, find_layer_stacks, is_transformer
from .transformer_width import TransformerWidthDecomposition


def decompose(
    model: nn.Module, config: ISTConfig, example_input: torch.Tensor | None = None
) -> Decomposition:
    """Build the decomposition ``config.decomposition`` names for ``model``, assigning units
    as ``config.assignment`` says.

    ``"auto"`` picks the layer-wise split for a `transformers` model, IST's neuron split
    for a chain of Linear layers, and ResIST otherwise.
    """
    decomposition = _build(model, config, example_input)
    decomposition.rotate = config.assignment == "rotate"
    if decomposition.rotate:
        decomposition.check_rotation()
    return decomposition


def _build(model: nn.Module, config: ISTConfig, example_input: torch.Tensor | None) -> Decomposition:
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
    "Assignment", "Decomposition", "MLPDecomposition", "Piece", "ResidualDecomposition", "ResidualStage",
    "TransformerLayerDecomposition", "TransformerWidthDecomposition", "average_into_global", "blocks_per_subnet",
    "deal_blocks", "decompose", "find_layer_stacks", "find_mlp_layers", "find_residual_stages", "is_transformer",
    "keep_frozen", "kept_tensors", "load_subnet", "split_neurons", "state_tensors",
]
