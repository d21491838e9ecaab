"""Where a global tensor's elements live in one round (IST arXiv 1910.02120 Sec. 3,
ResIST arXiv 2107.00961 Sec. 3), as seen by the exchange: the tensors that travel
(:class:`FieldSpec`) and, per tensor, its :class:`Layout` over the subnet groups.

* **whole** tensors (ResIST blocks, shared parameters) live in each holder's subnet;
* **indexed** tensors (IST neurons, FFN neurons, attention heads) are cut along dims 0
  and/or 1 into disjoint per-group index sets. An element is held by group ``g`` when
  every cut coordinate of it is in ``g``'s index set; an element nobody holds (the
  off-diagonal blocks of an IST middle layer) lives in its row's *owner shard*
  (contiguous row chunks, :func:`owner_rows`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..tensors import Piece

ANY = -2  # a dim that is not cut: every holder has all of it
NONE = -1  # a coordinate that no group holds this round


def owner_group(row: torch.Tensor | int, rows: int, num_groups: int) -> torch.Tensor | int:
    """The group owning row ``row`` of a tensor with ``rows`` rows while nobody holds it:
    contiguous row chunks, so each group stores ``~1/S`` of such tensors."""
    return (row * num_groups) // max(rows, 1)


def owner_rows(rows: int, num_groups: int, group: int) -> tuple[int, int]:
    """The row range ``[lo, hi)`` that ``group`` owns (:func:`owner_group`)."""
    return -(-group * rows // num_groups), -(-(group + 1) * rows // num_groups)


@dataclass(frozen=True)
class FieldSpec:
    """A global tensor that is averaged and moved: a parameter, a float buffer, or one
    optimizer-state entry of a parameter (``name = "<param>:<key>"``, ``source`` the
    parameter whose pieces it follows). Frozen tensors (``requires_grad=False``) never
    change, so they are only dispatched, never averaged."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    source: str = ""
    frozen: bool = False
    scalar: bool = False  # a per-tensor scalar state entry (Adam's step): held whole
    buffer: bool = False  # a float buffer (BatchNorm's running statistics): exact on a quantized wire

    @property
    def param(self) -> str:
        return self.source or self.name

    @property
    def numel(self) -> int:
        return self.shape.numel()


class Layout:
    """Where one tensor's elements live in one round (module docstring)."""

    def __init__(self, name: str, shape: torch.Size, pieces: Mapping[int, Piece], scalar: bool = False,
                 cache: dict | None = None) -> None:
        self.name, self.shape = name, torch.Size(shape)
        self.subnet_names = {g: p.subnet_name for g, p in pieces.items()}
        cuts = {g: _cut_dims(p, self.shape) for g, p in pieces.items()}
        if scalar or all(not c for c in cuts.values()):
            self.whole, self.dims = True, ()
            self.holders = tuple(sorted(pieces))
            return
        dims = {tuple(sorted(c)) for c in cuts.values()}
        if len(dims) != 1 or not dims.issubset({(0,), (1,), (0, 1)}):
            raise ValueError(f"{name}: pieces must all cut the same of dims 0 and 1 (got cuts "
                             f"{ {g: sorted(c) for g, c in cuts.items()} }); other layouts cannot be exchanged")
        self.whole, self.dims, self.holders = False, dims.pop(), tuple(sorted(pieces))
        self.holder: dict[int, np.ndarray] = {}  # per cut dim: each coordinate's holder (NONE: nobody)
        self.position: dict[int, np.ndarray] = {}  # ... and its position in that holder's index
        self.local_shapes = {g: tuple(len(cuts[g][d]) if d in cuts[g] else n for d, n in enumerate(self.shape))
                             for g in pieces}
        cache = {} if cache is None else cache
        for d in self.dims:
            key = (d, self.shape[d], tuple((g, id(cuts[g][d])) for g in sorted(pieces)))
            if key in cache:  # the same cut as another tensor's (a layer's weight, bias and norm)
                self.holder[d], self.position[d] = cache[key]
                continue
            holder = np.full(self.shape[d], NONE, dtype=np.int64)
            position = np.full(self.shape[d], NONE, dtype=np.int64)
            for g in sorted(pieces):
                index = cuts[g][d].numpy()
                if (holder[index] != NONE).any() or len(np.unique(index)) != len(index):
                    raise ValueError(f"{name}: index pieces overlap along dim {d}; the exchange needs disjoint pieces")
                holder[index] = g
                position[index] = np.arange(len(index))
            self.holder[d], self.position[d] = cache[key] = holder, position

    def cut_key(self) -> tuple:
        """Identity of the cut: tensors with the same key have the same boxes."""
        return (self.dims, tuple(self.shape), *(id(self.holder[d]) for d in self.dims))

    def holder_key(self, d: int) -> np.ndarray:
        """Per coordinate of dim ``d`` (0 or 1): its holder, ``ANY`` if the dim is not cut."""
        return self.holder[d] if d in self.dims else np.full(self.shape[d] if d < len(self.shape) else 1, ANY,
                                                               dtype=np.int64)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*getattr(self, "holder", {}).values(), *getattr(self, "position", {}).values()))


def _cut_dims(piece: Piece, shape: torch.Size) -> dict[int, torch.Tensor]:
    if piece.index is None:
        return {}
    return {d: idx.to("cpu", torch.long) for d, idx in enumerate(piece.index) if idx is not None and d < len(shape)}


def layouts(fields: Sequence[FieldSpec], pieces: Sequence[Sequence[Piece]]) -> dict[str, Layout]:
    """One round's :class:`Layout` of every parameter or buffer the fields follow, from each
    group's pieces (``pieces[g]``, as :meth:`Decomposition.pieces` returns them)."""
    by_tensor: dict[str, dict[int, Piece]] = {}
    for g, group_pieces in enumerate(pieces):
        for p in group_pieces:
            by_tensor.setdefault(p.global_name, {})[g] = p
    shapes = {f.name: f.shape for f in fields if not f.source}
    out: dict[str, Layout] = {}
    cache: dict = {}
    for f in fields:
        if f.param not in out:
            out[f.param] = Layout(f.param, shapes[f.param], by_tensor.get(f.param, {}), cache=cache)
    return out


__all__ = ["ANY", "NONE", "FieldSpec", "Layout", "layouts", "owner_group", "owner_rows"]
