"""Per-round random decompositions: pure functions of (seed, round, group)."""

from __future__ import annotations

import torch

from .base import Assignment, seeded_generator


def blocks_per_subnet(num_blocks: int, num_subnets: int, min_blocks: int) -> list[int]:
    """ResIST depth of each subnet: ``max(floor(N/S), m)``, leftovers to the first subnets."""
    base, extra = divmod(num_blocks, num_subnets)
    return [max(base + (s < extra), min_blocks) for s in range(num_subnets)]


def deal_blocks(
    num_blocks: int, num_subnets: int, min_blocks: int, seed: int, round_: int, group: str
) -> list[tuple[int, ...]]:
    """ResIST sampling (arXiv 2107.00961, Sec. 3): shuffle the stage's blocks and deal
    them round-robin; subnets below the minimum depth ``m`` keep walking the shuffled
    order (wrapping around) and take blocks they do not hold yet, so blocks repeat
    across subnets but never within one. Returns sorted block positions per subnet.
    """
    perm = torch.randperm(num_blocks, generator=seeded_generator(seed, round_, group)).tolist()
    dealt = [perm[s::num_subnets] for s in range(num_subnets)]
    for s, blocks in enumerate(dealt):
        start = s + num_subnets * len(blocks)
        walk = (perm[(start + t) % num_blocks] for t in range(num_blocks))
        while len(blocks) < min_blocks:
            b = next(walk)
            if b not in blocks:
                blocks.append(b)
    return [tuple(sorted(b)) for b in dealt]


def split_neurons(
    width: int, num_subnets: int, seed: int, round_: int, group: str
) -> list[tuple[int, ...]]:
    """IST sampling (arXiv 1910.02120, Sec. 3): a fresh disjoint equal split of a
    hidden layer's neurons each round. ``width`` must be divisible by ``num_subnets``.
    """
    perm = torch.randperm(width, generator=seeded_generator(seed, round_, group))
    part = width // num_subnets
    return [tuple(sorted(perm[s * part : (s + 1) * part].tolist())) for s in range(num_subnets)]


def split_assignment(widths: dict[str, int], num_subnets: int, seed: int, round_: int) -> Assignment:
    """IST's assignment: every group's units shuffled and split into S disjoint equal parts."""
    split = {g: split_neurons(w, num_subnets, seed, round_, g) for g, w in widths.items()}
    return Assignment(round_, tuple({g: split[g][s] for g in split} for s in range(num_subnets)))
