"""What a recipe evaluates on: a seeded held-out part of the training set
(``--val-split``) or an evenly spaced subset (``--eval-samples``); and the batches of a
rank's own training data that ``--recompute-bn`` measures BatchNorm statistics on."""

from __future__ import annotations

import copy

import torch
from torch.utils.data import Dataset


def held_out_split(train_set: Dataset, fraction: float, seed: int,
                   eval_set: Dataset | None = None) -> tuple[Dataset, Dataset]:
    """``--val-split``: a seeded ``fraction`` of ``train_set`` held out; (the rest, the held-out part).

    The held-out part is scored as the test set is: where both sets have a ``transform``
    (image folders), it reads the training images through ``eval_set``'s, not the training
    augmentation (a random crop and flip would make each evaluation a different draw)."""
    held = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = max(1, int(len(train_set) * fraction))
    scored = train_set
    if eval_set is not None and hasattr(train_set, "transform") and hasattr(eval_set, "transform"):
        scored = copy.copy(train_set)  # the same files, read as the test set is
        scored.transform = eval_set.transform
    return torch.utils.data.Subset(train_set, held[cut:]), torch.utils.data.Subset(scored, held[:cut])


def evenly_spaced(dataset, count: int):
    """``count`` items spread evenly through ``dataset``: a class-sorted ImageFolder's first
    ``count`` would be its first classes only."""
    n, count = len(dataset), min(count, len(dataset))
    return torch.utils.data.Subset(dataset, [i * n // count for i in range(count)])


def norm_batches(train_set: Dataset, count: int, batch_size: int, rank: int, world: int, seed: int,
                 device: torch.device, own: bool) -> list[torch.Tensor]:
    """``--recompute-bn``: ``count`` seeded batches of this rank's training inputs, drawn once
    and kept for every evaluation (``own``: ``train_set`` is this rank's alone, node-local or
    split; else items ``rank, rank + world, ...`` of the shared set)."""
    if not own:
        train_set = torch.utils.data.Subset(train_set, range(rank, len(train_set), world))
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed * 7919 + rank))
    batches = []
    for x, _ in loader:
        if len(batches) == count:
            break
        batches.append(x.to(device))
    return batches


__all__ = ["evenly_spaced", "held_out_split", "norm_batches"]
