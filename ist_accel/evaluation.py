"""Scoring the global model on a data set sharded over all ranks (IST Alg. 1's evaluation
of the global network): rank ``r`` scores items ``r, r + N, ...`` in its own DataLoader,
and the sums are all-reduced. Every rank runs the same number of batches (a rank short of
items repeats its last batch, not counted), as a streamed global model needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

Score = Callable[[nn.Module, Any], tuple[float, int]]


def accuracy_counts(model: nn.Module, batch: Any) -> tuple[float, int]:
    """Top-1 correct predictions and items of an ``(x, y)`` batch (the default score)."""
    x, y = batch
    return float((model(x).argmax(-1) == y).sum()), len(y)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with its tensors (also inside lists and tuples) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


def sharded_scores(model: contextlib.AbstractContextManager[nn.Module], dataset: Sequence[Any], rank: int,
                   world: int, device: torch.device, batch_size: int = 256, score: Score | None = None,
                   batches: int | None = None) -> torch.Tensor:
    """This rank's (sum of the metric, number of items) over its shard of ``dataset``, as a
    float64 tensor to all-reduce; ``model`` is entered once around all batches (every rank
    enters it and runs as many forwards as the largest shard needs, or ``batches`` when the
    ranks hold sets of their own, node-local data: the most any rank needs)."""
    score = score or accuracy_counts
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size)
    if batches is None:
        batches = -(-(-(-len(dataset) // world)) // batch_size)  # of the largest shard
    with model as view, torch.no_grad():
        last = None
        for batch in loader:
            value, count = score(view, to_device(batch, device))
            totals += torch.tensor([value, count], dtype=torch.float64, device=device)
            batches, last = batches - 1, batch
        for _ in range(batches if last is not None else 0):  # keep in step with the ranks that have more
            score(view, to_device(last, device))
    return totals


__all__ = ["Score", "accuracy_counts", "sharded_scores", "to_device"]
