"""Moving values between the global model and one process's subnets along their
:class:`~ist_accel.tensors.Piece` s: refill a subnet (start of a round), average the
subnets back into the global model (IST Alg. 1 / ResIST Alg. 1, the single-process
reference), keep frozen flags, and decide which optimizer state a subnet keeps.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..tensors import Piece, state_tensors


def load_subnet(
    subnet: nn.Module, global_state: Mapping[str, torch.Tensor], pieces: list[Piece]
) -> None:
    """Refill ``subnet`` in place from the global tensors (start of a round)."""
    local = state_tensors(subnet)
    with torch.no_grad():
        for piece in pieces:
            local[piece.subnet_name].copy_(piece.gather(global_state[piece.global_name]))


def keep_frozen(subnet: nn.Module, frozen: set[str], pieces: list[Piece]) -> None:
    """A subnet parameter trains only if the global parameter it holds this round does:
    ``requires_grad=False`` of the global model is kept under every decomposition."""
    params = dict(subnet.named_parameters())
    for piece in pieces:
        param = params.get(piece.subnet_name)
        if param is not None:
            param.requires_grad_(piece.global_name not in frozen)


def kept_tensors(held: list[Piece], following: list[Piece]) -> dict[str, str]:
    """Optimizer-state policy ``local``: which subnet tensors of the next round hold exactly
    the global values a tensor of this round held (same global tensor, same index), as
    ``{next subnet name: this round's subnet name}``. Their optimizer state can stay where
    it is (the shared set always; a ResIST block dealt to the same group again, even in
    another slot); every other tensor starts fresh."""

    def signature(piece: Piece) -> tuple:
        index = None if piece.index is None else tuple(None if i is None else tuple(i.tolist()) for i in piece.index)
        return piece.global_name, index

    def by_tensor(pieces: list[Piece]) -> dict[str, tuple]:
        out: dict[str, list[tuple]] = {}
        for piece in pieces:
            out.setdefault(piece.subnet_name, []).append(signature(piece))
        return {name: tuple(sorted(sigs, key=repr)) for name, sigs in out.items()}

    source = {sig: name for name, sig in by_tensor(held).items()}
    return {name: source[sig] for name, sig in by_tensor(following).items() if sig in source}


def average_into_global(
    global_state: Mapping[str, torch.Tensor],
    contributions: list[tuple[list[Piece], Mapping[str, torch.Tensor]]],
) -> dict[str, torch.Tensor]:
    """Average each global element over the subnets that held it (DESIGN: averaging).

    ``contributions`` is one ``(pieces, subnet_tensors)`` pair per subnet. Elements no
    subnet held keep their value; an element with one holder is a plain copy. Returns, per
    tensor some subnet held, the boolean mask of its held elements.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for pieces, tensors in contributions:
        for piece in pieces:
            g = global_state[piece.global_name]
            if piece.global_name not in sums:
                sums[piece.global_name] = torch.zeros_like(g, dtype=torch.float64)
                counts[piece.global_name] = torch.zeros(g.shape, dtype=torch.float64)
            value = tensors[piece.subnet_name].detach().to(torch.float64)
            piece.scatter_add(sums[piece.global_name], value)
            piece.scatter_add(counts[piece.global_name], torch.ones_like(value))
    with torch.no_grad():
        for name, total in sums.items():
            held = counts[name] > 0
            g = global_state[name]
            mean = total / counts[name].clamp_min(1)
            g.copy_(torch.where(held, mean, g.to(torch.float64)).to(g.dtype))
    return {name: count > 0 for name, count in counts.items()}


__all__ = ["average_into_global", "keep_frozen", "kept_tensors", "load_subnet"]
