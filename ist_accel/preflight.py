"""Everything that can be checked before a process group or a file is touched.

:func:`check_setup` checks the world size and the model against the config (which
validated itself when built) with the decomposition's own checks (enough blocks,
divisible widths, a partitionable structure) and returns the decomposition. The round
engine runs it before creating any process group; recipes run it before creating the
Accelerator."""

from __future__ import annotations

import torch
from torch import nn

from .config import ISTConfig
from .decompositions import Decomposition, decompose


def check_setup(
    model: nn.Module, config: ISTConfig, world_size: int, example_input: torch.Tensor | None = None
) -> Decomposition:
    """Raise ``ValueError`` (naming the bad value and what is accepted) or return the decomposition."""
    if not isinstance(config, ISTConfig):
        raise TypeError(f"config must be an ist_accel.ISTConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    config.check_world_size(world_size)
    return decompose(model, config, example_input)


__all__ = ["check_setup"]
