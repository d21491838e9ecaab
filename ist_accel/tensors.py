"""The tensor-level vocabulary every other module shares: which tensors are averaged
(:func:`state_tensors`), where a subnet tensor comes from in the global model
(:class:`Piece`), and a fast repeated lookup of a module's tensors (:class:`TensorSlots`).

A leaf module: it imports torch and nothing from this project, so the decompositions,
the initial-value sources (``init.py``) and the engine can all build on it without an
import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

Index = tuple["torch.Tensor | None", ...] | None


@dataclass(frozen=True)
class Piece:
    """Subnet tensor ``subnet_name`` equals ``global[global_name][index]``.

    ``index`` is ``None`` for the whole tensor, else one entry per leading dim:
    a sorted ``LongTensor`` of kept positions or ``None`` for a dim kept whole.
    """

    subnet_name: str
    global_name: str
    index: Index = None

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Read this piece out of the global tensor (a copy)."""
        if self.index is None:
            return tensor.detach().clone()
        out = tensor.detach()
        for dim, idx in enumerate(self.index):
            if idx is not None:
                out = out.index_select(dim, idx.to(out.device))
        return out.clone()

    def scatter_add(self, target: torch.Tensor, value: torch.Tensor) -> None:
        """``target[index] += value`` (in place)."""
        if self.index is None:
            target.add_(value)
            return
        target.index_put_(self.grid(target), value, accumulate=True)

    def numel(self, global_shape: torch.Size) -> int:
        """Elements of this piece of a global tensor of shape ``global_shape``."""
        n = 1
        for dim, size in enumerate(global_shape):
            idx = self.index[dim] if self.index is not None and dim < len(self.index) else None
            n *= size if idx is None else len(idx)
        return n

    def grid(self, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The piece's coordinates in ``target`` as an open mesh (for ``index_put_``)."""
        axes = []
        for dim, size in enumerate(target.shape):
            idx = self.index[dim] if dim < len(self.index) else None
            axes.append(torch.arange(size, device=target.device) if idx is None else idx.to(target.device))
        return torch.meshgrid(*axes, indexing="ij")


def state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and floating-point buffers: everything that is averaged.

    Integer buffers (BatchNorm's ``num_batches_tracked``) stay local to a subnet.
    """
    out = dict(module.named_parameters())
    out.update((n, b) for n, b in module.named_buffers() if b.is_floating_point())
    return out


class TensorSlots:
    """Fast repeated :func:`state_tensors` of one module: where each tensor sits (owning
    module, attribute) is found once; every lookup reads the slot again, so a tensor that
    ``module.to()`` replaced is seen. ``slots`` lists ``(name, store, attribute)``, the
    store being the owning module's parameter or buffer dict."""

    def __init__(self, module: nn.Module) -> None:
        owners = dict(module.named_modules())
        self.slots = []
        for name in state_tensors(module):
            path, _, attr = name.rpartition(".")
            owner = owners[path]
            self.slots.append((name, owner._parameters if attr in owner._parameters else owner._buffers, attr))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every state tensor of the module, by name, as it is now (detached)."""
        return {name: store[attr].detach() for name, store, attr in self.slots}


__all__ = ["Index", "Piece", "TensorSlots", "state_tensors"]
