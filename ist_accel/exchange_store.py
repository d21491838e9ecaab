"""What an exchange keeps between rounds: the owner shards (rows nobody holds) and flat
buffers reused round after round (:mod:`ist_accel.exchange`)."""

from __future__ import annotations

from typing import Any

import torch


class OwnerShards:
    """Rows of index-cut tensors that this group owns while no group holds them
    (:func:`~ist_accel.transfer.owner_rows`): name -> values of rows ``[lo, hi)``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows: dict[str, tuple[int, int]] = {}
        self.values: dict[str, torch.Tensor] = {}

    def ensure(self, name: str, rows: tuple[int, int], shape: torch.Size, dtype: torch.dtype,
               init: torch.Tensor | None = None) -> torch.Tensor:
        if name not in self.values:
            lo, hi = rows
            self.rows[name] = rows
            self.values[name] = (init[lo:hi].detach().clone().to(self.device) if init is not None else
                                 torch.zeros((hi - lo, *shape[1:]), dtype=dtype, device=self.device))
        return self.values[name]

    def numel(self) -> int:
        return sum(v.numel() for v in self.values.values())

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values.values())

    def state_dict(self) -> dict[str, Any]:
        """Copies of the shards and their rows, for a checkpoint of this rank."""
        return {"owners": {n: v.clone() for n, v in self.values.items()},
                "owner_rows": {n: list(r) for n, r in self.rows.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (shards of optimizer state appear at the first sync)."""
        for name, value in state["owners"].items():
            self.rows[name] = tuple(state["owner_rows"][name])
            self.values[name] = value.to(self.device)


class Buffers:
    """Flat buffers by name, grown when a plan needs more and reused otherwise."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._store: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        key = (name, dtype)
        held = self._store.get(key)
        if held is None or held.numel() < numel:
            held = torch.empty(max(numel, int(1.25 * held.numel()) if held is not None else numel), dtype=dtype,
                               device=self.device)
            self._store[key] = held
        return held[:numel]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._store.values())


__all__ = ["Buffers", "OwnerShards"]
