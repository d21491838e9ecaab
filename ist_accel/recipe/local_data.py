"""A recipe's data when each rank trains on its own part: node-local folders (``--data``
with ``{rank}``/``{node}``, :mod:`ist_accel.node_local`) or a seeded partition of one
training set (``--split dirichlet:ALPHA|classes:K``, :mod:`ist_accel.data.partition`).

Every rank still does the same number of optimizer steps (rounds and the baselines' syncs
are collectives): ``--max-steps``, or ``--epochs`` of the MEAN local set, i.e. as many
batches per rank as all ranks' sets hold together divided by the world size, so an epoch
is as many samples as one pass over the union of the data (a partition gets the step
budget of ``iid``); a rank with more than the mean goes on into its next pass in the next
epoch, one with less cycles its set. A rank's own epochs (logged ``train/epoch``) count
passes over its own set. Node-local evaluation sets: every rank scores the global model
on its own set and the accuracy is sum correct / sum items over all ranks (one all-reduce),
i.e. the mean weighted by the sets' sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import Dataset, Subset

from ..data.partition import dataset_labels, parse_split, partition
from ..evaluation import sharded_scores
from ..node_local import LocalSource, is_local_template, local_source

logger = logging.getLogger(__name__)


@dataclass
class LocalData:
    """This rank's training set, and its evaluation set when that is node-local too."""

    train_set: Dataset
    eval_set: Dataset
    eval_local: bool
    split: str  # "node-local", or the --split spec
    source: LocalSource | None


def local_data(args: argparse.Namespace, accelerator: Accelerator, train_set: Dataset,
               eval_set: Dataset) -> LocalData | None:
    """This rank's sets, or ``None`` for today's shared data (one set, sharded over all ranks)."""
    template = getattr(args, "data_template", None)
    split = parse_split(getattr(args, "split", "iid") or "iid")
    rank, world = accelerator.process_index, accelerator.num_processes
    if is_local_template(template):
        source = local_source(template)
        check_same_classes(train_set, source)
        if source.share_count > 1:  # ranks sharing one folder split it among themselves only
            train_set, eval_set = (Subset(s, range(source.share_index, len(s), source.share_count))
                                   for s in (train_set, eval_set))
        return LocalData(train_set, eval_set, True, "node-local", source)
    if split.kind == "iid":
        return None
    parts = partition(dataset_labels(train_set), world, split, getattr(args, "split_seed", 0), args.batch_size)
    logger.info("--split %s: worker part sizes %s", split, [len(p) for p in parts])
    return LocalData(Subset(train_set, parts[rank]), eval_set, False, str(split), None)


def check_same_classes(train_set: Dataset, source: LocalSource) -> None:
    """Node-local image folders must agree on the label space: an error naming the ranks whose
    class folders differ (``--classes`` names the whole set when a site lacks some)."""
    classes = list(getattr(train_set, "class_to_idx", {}))  # ImageFolder: names -> numbers per folder
    every = gather_object([classes])
    differing = [r for r, c in enumerate(every) if c != every[0]]
    if differing:
        shown = "; ".join(f"rank {r}: {every[r]}" for r in [0, *differing[:3]])
        raise ValueError(f"node-local class folders differ between ranks ({shown}); give --classes with the whole "
                         "label set (comma-separated or a file, one name a line) so every node maps names alike")


def agreed_batches(accelerator: Accelerator, own_batches: int, rank: int) -> int:
    """Batches per epoch for the step budget: the mean of the ranks' own loader lengths (one
    all-reduce); a rank without one whole batch is an error naming it."""
    figures = torch.tensor([own_batches, 1 if own_batches == 0 else 0], dtype=torch.float64,
                           device=accelerator.device)
    total, empty = accelerator.reduce(figures, "sum").tolist()
    if empty:
        raise ValueError(f"{int(empty)} rank(s) hold fewer items than one batch (rank {rank}: {own_batches} batches); "
                         "lower --batch-size or give every node more data")
    return max(1, int(total) // accelerator.num_processes)


class LocalEval:
    """Scores the global model on this rank's own evaluation set; every rank runs as many
    batches as the largest set needs (the global model may be streamed), and the sums are
    all-reduced: the accuracy over all ranks' items."""

    def __init__(self, accelerator: Accelerator, dataset: Dataset, batch_size: int) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        figures = torch.tensor([-(-len(dataset) // batch_size), len(dataset)], dtype=torch.float64,
                               device=accelerator.device)
        self.batches = int(accelerator.reduce(figures[:1].clone(), "max").item())
        self.items = int(accelerator.reduce(figures[1:].clone(), "sum").item())

    def accuracy(self, accelerator: Accelerator, model: nn.Module) -> float:
        """``model`` (in eval mode: IST's global model) scored on every rank's set."""
        totals = sharded_scores(contextlib.nullcontext(accelerator.unwrap_model(model)), self.dataset, 0, 1,
                                accelerator.device, self.batch_size, batches=self.batches)
        totals = accelerator.reduce(totals, "sum")
        return float(totals[0] / totals[1].clamp_min(1))


def class_counts(dataset: Dataset) -> dict[str, int]:
    """Items per class name (the label number where the set has no class names)."""
    try:
        labels = dataset_labels(dataset)
    except ValueError:
        return {}
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    names = list(getattr(base, "classes", []) or [])
    counts = Counter(int(label) for label in labels)
    return {(names[c] if c < len(names) else str(c)): n for c, n in sorted(counts.items())}


def data_per_rank(accelerator: Accelerator, data: LocalData) -> list[dict[str, Any]]:
    """What every rank read (gathered on every rank): its path, items and items per class."""
    source = data.source
    record = {"rank": accelerator.process_index, "node": source.node if source else None,
              "path": source.path if source else None, "train_items": len(data.train_set),
              "train_classes": class_counts(data.train_set),
              "eval_items": len(data.eval_set) if data.eval_local else None,
              "eval_classes": class_counts(data.eval_set) if data.eval_local else None}
    return sorted(gather_object([record]), key=lambda r: r["rank"])


__all__ = ["LocalData", "LocalEval", "agreed_batches", "check_same_classes", "class_counts", "data_per_rank",
           "local_data"]
