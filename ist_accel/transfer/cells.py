"""The geometry of one round transition, tensor by tensor: an indexed tensor's *cells*
and *boxes*, and the transition's lower bound counted on the cells (whole tensors:
:func:`whole_bound`; docs/cost.md).

Per cut dim, coordinates fall into a few *classes* (same holder now, same holder next,
same owner); a class of rows times a class of columns is a cell in which every element
has the same place now and next. Cells with the same source, destination and column set
are merged into :class:`Box` es (row index vector x column index vector), so the
geometry's memory is O(units), whatever the tensor size. Every group derives the same
boxes in the same order from the shared assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .layout import ANY, NONE, FieldSpec, Layout, owner_group


@dataclass(frozen=True)
class Box:
    """Global rows x global columns (``None``: the whole dim) of one tensor."""

    rows: np.ndarray | None
    cols: np.ndarray | None


def field_bound(f: FieldSpec, now: Layout, nxt: Layout, S: int) -> tuple[list[float], list[float]]:
    """Elements of field ``f`` each group must send and receive between two layouts."""
    if f.scalar or now.whole:
        return whole_bound(f, now.holders, nxt.holders, S)
    sent, received = _Grid(now, nxt, S).bound(S)
    k = trailing_numel(f.shape)
    return (sent * k).tolist(), (received * k).tolist()


def whole_bound(f: FieldSpec, H: tuple[int, ...], Hn: tuple[int, ...], S: int) -> tuple[list[float], list[float]]:
    """A whole tensor's bound (accounting.py): shared: ``2(S-1)/S`` each; else each holder's
    update leaves it once unless it alone holds it next, each next holder receives it once
    unless it alone held it. Frozen: shared costs nothing, otherwise only next holders that
    lack it receive it (from one holder)."""
    n = f.numel
    sent, received = [0.0] * S, [0.0] * S
    if f.frozen:
        lacking = [c for c in Hn if c not in H]
        if lacking and len(H) != S:
            sent[H[0]] = float(n * len(lacking))
            for c in lacking:
                received[c] = float(n)
        return sent, received
    if len(H) == len(Hn) == S:
        share = 2 * (S - 1) / S * n
        return [share] * S, [share] * S
    for s in H:
        if tuple(Hn) != (s,):
            sent[s] = float(n)
    for c in Hn:
        if tuple(H) != (c,):
            received[c] = float(n)
    return sent, received


def trailing_numel(shape: torch.Size) -> int:
    """Elements per (row, column) of a tensor: the product of its dims after the first two."""
    return math.prod(shape[2:]) if len(shape) > 2 else 1


def box_numel(box: Box, shape: torch.Size) -> int:
    """Elements of ``box`` in a tensor of shape ``shape``."""
    rows = shape[0] if box.rows is None else len(box.rows)
    cols = (shape[1] if len(shape) > 1 else 1) if box.cols is None else len(box.cols)
    return rows * cols * trailing_numel(shape)


class _Grid:
    """The (row class x column class) cells of one indexed tensor between two layouts: for
    each cell its place now (``L``) and next (``Ln``), and whether that place is the holder's
    subnet (kind 0) or the owner shard (kind 1). Vectorized over classes (numpy: these are
    small arrays, where per-operation cost dominates)."""

    def __init__(self, now: Layout, nxt: Layout, S: int) -> None:
        if now.dims != nxt.dims:
            raise ValueError(f"{now.name}: cut along dims {now.dims} now and {nxt.dims} next")
        self.shape = shape = now.shape
        self.two_d = len(shape) > 1
        col_keys = (np.stack([now.holder_key(1), nxt.holder_key(1)], 1) if self.two_d
                    else np.full((1, 2), ANY, dtype=np.int64))
        rows0 = np.stack([now.holder_key(0), nxt.holder_key(0)], 1)
        cols, self.col_ids = _classes(col_keys, S)
        rows, self.row_ids = _classes(rows0, S)
        H, Hn = _holders(rows, cols)
        self.owner = bool(((H == NONE) | (Hn == NONE)).any())
        if self.owner:  # split rows by owner too
            owners = owner_group(np.arange(shape[0]), shape[0], S)
            rows, self.row_ids = _classes(np.concatenate([rows0, owners[:, None]], 1), S)
            H, Hn = _holders(rows, cols)
            O = rows[:, 2:3]
            self.L, self.Ln = np.where(H >= 0, H, O), np.where(Hn >= 0, Hn, O)
        else:
            self.L, self.Ln = H, Hn
        self.kind_now = (H < 0).astype(np.int64)  # 0: the holder's subnet, 1: the owner shard
        self.kind_next = (Hn < 0).astype(np.int64)
        self.row_counts = np.bincount(self.row_ids, minlength=len(rows))
        self.col_counts = np.bincount(self.col_ids, minlength=len(cols))

    def counts(self) -> np.ndarray:
        cols = self.col_counts if self.two_d else np.ones(1, dtype=np.int64)
        return (self.row_counts[:, None] * cols[None, :]).astype(np.float64)

    def bound(self, S: int) -> tuple[np.ndarray, np.ndarray]:
        """Elements (per trailing slice) each group must send / receive: an element leaves
        its place when its place changes (module docstring of accounting.py)."""
        moved = (self.L != self.Ln) * self.counts()
        sent = np.bincount(self.L.ravel(), weights=moved.ravel(), minlength=S)
        received = np.bincount(self.Ln.ravel(), weights=moved.ravel(), minlength=S)
        return sent, received

    def boxes(self, cells: np.ndarray) -> list[Box]:
        """Merge the cells of a boolean (row class x column class) mask into boxes: row
        classes with the same set of columns become one box, in order of first row class."""
        with_rows = np.flatnonzero(cells.any(1))
        if not len(with_rows):
            return []
        packed = np.packbits(cells[with_rows], axis=1)
        groups: dict[bytes, int] = {}
        which = np.array([groups.setdefault(row.tobytes(), len(groups)) for row in packed], dtype=np.int64)
        first = np.unique(which, return_index=True)[1]  # groups are numbered by first row class already
        signatures = cells[with_rows[first]]
        group_of_class = np.full(len(cells), -1, dtype=np.int64)
        group_of_class[with_rows] = which
        row_group = group_of_class[self.row_ids]
        out = []
        for g in range(len(groups)):
            rows = np.flatnonzero(row_group == g)
            cols = np.flatnonzero(signatures[g][self.col_ids]) if self.two_d else None
            out.append(Box(None if len(rows) == self.shape[0] else rows,
                           None if cols is None or len(cols) == self.shape[1] else cols))
        return out


KINDS = ("sub", "own")


class TransitionBoxes:
    """The boxes of one indexed tensor between two layouts, for every (source, destination)
    pair that involves group ``me`` (module docstring), and the tensor's bound for ``me``."""

    def __init__(self, now: Layout, nxt: Layout, me: int, S: int) -> None:
        grid = _Grid(now, nxt, S)
        self.owner = grid.owner
        L, Ln, kind_now, kind_next = grid.L, grid.Ln, grid.kind_now, grid.kind_next
        sent, received = grid.bound(S)
        self.bound = (float(sent[me]), float(received[me]))
        # cells to copy: everything that involves me, except elements staying in my owner shard
        involved = ((L == me) | (Ln == me)) & ~((L == Ln) & (kind_now == 1) & (kind_next == 1))
        code = (L * S + Ln) * 4 + kind_now * 2 + kind_next
        self.pairs: dict[tuple[int, int], list] = {}
        for c in np.unique(code[involved]).tolist():
            pair, kind = divmod(c, 4)
            boxes = grid.boxes(involved & (code == c))
            self.pairs.setdefault(divmod(pair, S), []).append(((KINDS[kind // 2], KINDS[kind % 2]), boxes))


def located_boxes(layout: Layout, S: int) -> tuple[bool, dict[int, list[tuple[str, list[Box]]]]]:
    """Where an indexed tensor's elements are in one round, as boxes per group and kind
    ("sub" or "own"): every element exactly once. Also whether it has an owner part."""
    grid = _Grid(layout, layout, S)
    code = grid.L * 2 + grid.kind_now
    out: dict[int, list] = {}
    for c in np.unique(code).tolist():
        group, kind = divmod(c, 2)
        out.setdefault(group, []).append((KINDS[kind], grid.boxes(code == c)))
    return grid.owner, out


def _classes(keys: np.ndarray, S: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of ``keys`` (small integers >= ANY) in sorted order, and each
    coordinate's class index."""
    base = S + 3
    weights = base ** np.arange(keys.shape[1], dtype=np.int64)
    code = ((keys - ANY) * weights).sum(1)
    unique, ids = np.unique(code, return_inverse=True)
    decoded = (unique[:, None] // weights) % base + ANY
    return decoded, ids.ravel()


def _holders(rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Holder now and next of every (row class, column class) cell (``NONE``: unheld)."""
    out = []
    for t in (0, 1):
        a, b = rows[:, t : t + 1], cols[None, :, t]
        h = np.where(a == ANY, b, np.where(b == ANY, a, np.where(a == b, a, NONE)))
        out.append(np.where(h < 0, NONE, h))
    return out[0], out[1]


__all__ = ["KINDS", "Box", "TransitionBoxes", "box_numel", "field_bound", "located_boxes", "trailing_numel",
           "whole_bound"]
