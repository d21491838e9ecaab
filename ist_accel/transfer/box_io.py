"""Addressing a :class:`~.cells.Box` in one group's local tensors (its subnet tensor
or its owner shard) and reading or writing it: the only tensor work a transfer plan
needs, shared by the exchange (pack / unpack) and the reads of the global model.
"""

from __future__ import annotations

import numpy as np
import torch

from .cells import Box
from .layout import Layout


def local_index(box: Box, kind: str, layout: Layout, owner_lo: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A box's rows and columns in a group's subnet tensor (``kind="sub"``: positions in its
    pieces) or owner shard (``"own"``: rows from ``owner_lo``, all columns)."""
    if kind == "sub":
        rows = box.rows if (box.rows is None or 0 not in layout.dims) else layout.position[0][box.rows]
        cols = box.cols if (box.cols is None or 1 not in layout.dims) else layout.position[1][box.cols]
        return rows, cols
    rows = (np.arange(owner_lo, layout.shape[0]) if box.rows is None else box.rows) - owner_lo
    return rows, box.cols


def compact_index(index: np.ndarray | None) -> torch.Tensor | None:
    """A numpy index vector as a contiguous int64 tensor sharing its memory (``None`` stays
    ``None``: the whole dim), ready for ``index_select`` / ``index_copy_``."""
    return None if index is None else torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))


def read_box(source: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out[...] = source[rows][:, cols]`` (local indices; ``None``: the whole dim). Two
    ``index_select`` passes: on the CPU a third of the time of one advanced-indexing gather."""
    if rows is not None and cols is not None:
        picked = source.index_select(0, rows)
        if out.dtype == source.dtype and out.is_contiguous():
            torch.index_select(picked, 1, cols, out=out)
        else:
            out.copy_(picked.index_select(1, cols))
    elif rows is not None:
        if out.dtype == source.dtype and out.is_contiguous():
            torch.index_select(source, 0, rows, out=out)
        else:
            out.copy_(source.index_select(0, rows))
    elif cols is not None:
        out.copy_(source.index_select(1, cols))
    else:
        out.copy_(source)


def write_box(target: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None, value: torch.Tensor) -> None:
    """``target[rows][:, cols] = value`` in place (local indices; ``None``: the whole dim).
    A box of a contiguous tensor is written as one ``index_copy_`` of its (row, column)
    positions, computed here (half the time of advanced indexing), not kept in the plan."""
    value = value.to(target.dtype)
    if rows is not None and cols is not None:
        if target.is_contiguous():
            n1 = target.shape[1]
            flat = target.view(target.shape[0] * n1, -1)
            where = (rows[:, None] * n1 + cols[None, :]).reshape(-1)
            flat.index_copy_(0, where, value.reshape(where.numel(), -1))
        else:
            target[rows[:, None], cols] = value
    elif rows is not None:
        target.index_copy_(0, rows, value)
    elif cols is not None:
        target.index_copy_(1, cols, value)
    else:
        target.copy_(value)


__all__ = ["compact_index", "local_index", "read_box", "write_box"]
