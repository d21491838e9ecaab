"""What a recipe evaluates on: a seeded held-out part of the training set
(``--val-split``) or an evenly spaced subset (``--eval-samples``)."""

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


__all__ = ["evenly_spaced", "held_out_split"]
