"""What a recipe evaluates on: a seeded held-out part of the training set
(``--val-split``) or an evenly spaced subset (``--eval-samples``); the batches of a rank's
own training data that ``--recompute-bn`` measures BatchNorm statistics on; and
:class:`EpochSeeded`, which makes a training set's augmentation resumable."""

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


class EpochSeeded(torch.utils.data.Dataset):
    """``dataset`` whose random augmentation is a pure function of (seed, epoch, item): each
    item is read under its own seed of the global torch RNG, which is put back after. A run
    resumed mid-epoch then augments every item as the uninterrupted run did; before, it did
    not: Accelerate's loaders fetch one batch ahead, so a checkpoint's RNG state was already
    past the next batch's augmentation, which the resumed run drew again."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        rng = torch.random.default_generator
        state = rng.get_state()
        rng.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + index) % 2**63)
        try:
            return self.dataset[index]
        finally:
            rng.set_state(state)


def augments(dataset: Dataset) -> bool:
    """Whether ``dataset`` (or a set it wraps) applies a transform, which may draw random numbers."""
    while dataset is not None:
        if getattr(dataset, "transform", None) is not None:
            return True
        dataset = getattr(dataset, "dataset", None)
    return False


def norm_batches(train_set: Dataset, count: int, batch_size: int, rank: int, world: int, seed: int,
                 device: torch.device, own: bool) -> list[torch.Tensor]:
    """``--recompute-bn``: ``count`` seeded batches of this rank's training inputs, drawn once
    and kept for every evaluation (``own``: ``train_set`` is this rank's alone, node-local or
    split; else items ``rank, rank + world, ...`` of the shared set)."""
    if count == 0:  # (no batch read: nothing drawn from the RNG that training goes on with)
        return []
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


__all__ = ["EpochSeeded", "augments", "evenly_spaced", "held_out_split", "norm_batches"]
