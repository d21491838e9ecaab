"""A seeded partition of one training set over the workers, for runs with skewed data
(``--split``): each worker trains on its own part only, as if the parts were data that
stays where it is (IST's "mandatory distribution", Yuan et al., arXiv 1910.02120, Sec. 1).

``iid``: a random permutation cut into equal parts. ``dirichlet:ALPHA``: label skew after
Hsu et al. (arXiv 1909.06335): every class's items are dealt to the workers in proportions
drawn from ``Dirichlet(ALPHA, ..., ALPHA)`` (small ALPHA: a worker sees few classes; large:
near iid). ``classes:K``: every worker holds exactly K classes (the classes shuffled, then
dealt round-robin, so every class is held by at least one worker when workers x K >= classes)
and each class's items are split evenly among the workers that hold it.

The parts depend only on the labels, the number of parts, the spec and the seed: every
method of a benchmark sees the same parts. Pure; no process group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SPLIT_KINDS", "Split", "dataset_labels", "parse_split", "partition"]

SPLIT_KINDS = ("iid", "dirichlet", "classes")
RESAMPLES = 100  # dirichlet draws tried before a part too small for one batch is an error


@dataclass(frozen=True)
class Split:
    """A parsed ``--split``: ``kind`` and its number (ALPHA or K; ``None`` for iid)."""

    kind: str
    value: float | None = None

    def __str__(self) -> str:
        if self.kind == "iid":
            return "iid"
        value = int(self.value) if self.kind == "classes" else self.value
        return f"{self.kind}:{value:g}"

    @property
    def slug(self) -> str:
        """A folder-name form: ``iid``, ``dirichlet0.1``, ``classes2``."""
        return str(self).replace(":", "")


def parse_split(spec: str) -> Split:
    """``iid``, ``dirichlet:ALPHA`` (ALPHA > 0) or ``classes:K`` (K >= 1); a ``ValueError`` naming
    what is accepted otherwise."""
    kind, _, value = spec.partition(":")
    accepted = "iid, dirichlet:ALPHA (ALPHA > 0, e.g. dirichlet:0.1) or classes:K (K >= 1, e.g. classes:2)"
    if kind == "iid" and not value:
        return Split("iid")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"--split {spec!r}: expected {accepted}") from None
    if kind == "dirichlet" and np.isfinite(number) and number > 0:
        return Split("dirichlet", number)
    if kind == "classes" and number.is_integer() and number >= 1:
        return Split("classes", number)
    raise ValueError(f"--split {spec!r}: expected {accepted}")


def dataset_labels(dataset: Any) -> np.ndarray:
    """The integer labels of a data set without reading its images: its ``targets``
    (ImageFolder, MNIST idx, the synthetic set), through ``Subset``s, or a ``datasets``
    split's label column (:class:`~ist_accel.data.images.HFImages`)."""
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if hasattr(dataset, "targets"):
        return np.asarray(dataset.targets, dtype=np.int64)
    if hasattr(dataset, "split") and hasattr(dataset, "label_column"):
        return np.asarray(dataset.split[dataset.label_column], dtype=np.int64)
    raise ValueError(f"cannot read the labels of a {type(dataset).__name__} without loading every item: give it a "
                     "'targets' attribute to use --split")


def partition(labels: Sequence[int] | np.ndarray, parts: int, split: Split | str, seed: int = 0,
              min_size: int = 1) -> list[list[int]]:
    """Indices of each of ``parts`` workers' part: disjoint, together every index, each
    sorted. ``min_size``: every part holds at least this many items (a worker needs one
    batch); dirichlet redraws (up to ``RESAMPLES`` times) until it does."""
    split = parse_split(split) if isinstance(split, str) else split
    labels = np.asarray(labels, dtype=np.int64)
    if parts < 1:
        raise ValueError(f"need at least one part, got {parts}")
    rng = np.random.default_rng([seed, parts])
    if split.kind == "iid":
        chunks = np.array_split(rng.permutation(len(labels)), parts)
    elif split.kind == "dirichlet":
        for _ in range(RESAMPLES):
            chunks = _dirichlet(labels, parts, split.value, rng)
            if min(len(c) for c in chunks) >= min_size:
                break
    else:
        chunks = _classes(labels, parts, int(split.value), rng)
    result = [sorted(int(i) for i in c) for c in chunks]
    small = [(w, len(c)) for w, c in enumerate(result) if len(c) < min_size]
    if small:
        raise ValueError(f"--split {split}: worker(s) {', '.join(f'{w} ({n} items)' for w, n in small)} get fewer "
                         f"than {min_size} items (one batch); use a larger ALPHA, fewer workers or a smaller batch")
    return result


def _dirichlet(labels: np.ndarray, parts: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    chunks: list[list[np.ndarray]] = [[] for _ in range(parts)]
    for c in np.unique(labels):
        items = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(parts, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(items)).astype(np.int64)
        for w, piece in enumerate(np.split(items, cuts)):
            chunks[w].append(piece)
    return [np.concatenate(c) for c in chunks]


def _classes(labels: np.ndarray, parts: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = rng.permutation(np.unique(labels))
    if k > len(classes) or parts * k < len(classes):
        raise ValueError(f"--split classes:{k}: {parts} workers x {k} classes must hold all {len(classes)} classes "
                         f"(and K at most {len(classes)})")
    held = [[classes[(w * k + j) % len(classes)] for j in range(k)] for w in range(parts)]
    chunks: list[list[np.ndarray]] = [[] for _ in range(parts)]
    for c in classes:
        holders = [w for w in range(parts) if c in held[w]]
        for w, piece in zip(holders, np.array_split(rng.permutation(np.flatnonzero(labels == c)), len(holders))):
            chunks[w].append(piece)
    return [np.concatenate(c) if c else np.zeros(0, dtype=np.int64) for c in chunks]
