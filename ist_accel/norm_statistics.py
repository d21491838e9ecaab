"""BatchNorm statistics of the model being scored, recomputed over every node's data.

Under label skew the running statistics a model carries are skewed too: DDP keeps rank 0's,
and IST averages each BatchNorm unit over the workers that held it in the round, often one
worker's data (IST, arXiv 1910.02120, Sec. 3: units are dealt to one subnet each). Before an
evaluation, :func:`recomputed_batchnorm` replaces them by the statistics of the model's own
activations over a few batches of *every* node's training data, without moving any data: a
node sends only per-channel sums (``2 C + 1`` float64 values per norm layer).

The statistics are exact for the pooled batches, layer by layer: norm ``l`` is measured with
every earlier norm already set to its pooled statistics (evaluation mode), so the model that
is then scored sees at each norm the mean and variance of its input over all nodes' batches.
That costs one partial forward per norm and batch and one small all-reduce per norm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

AllReduce = Callable[[torch.Tensor], torch.Tensor]


class _Measured(Exception):
    """Raised by the measuring hook: the rest of the forward is not needed."""


def _call(model: nn.Module, inputs: Any) -> None:
    if isinstance(inputs, Mapping):
        model(**inputs)
    elif isinstance(inputs, (list, tuple)):
        model(*inputs)
    else:
        model(inputs)


def default_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the default process group (itself where there is none)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def scored_module(model: nn.Module) -> nn.Module:
    """The module whose forward ``model`` runs when scored: an ISTModel after ``.eval()``
    scores the global model's evaluation view, which must be gathered whole (a streamed view
    drops each module after its forward, and with it any statistics set on it)."""
    view, ist = getattr(model, "global_view", None), getattr(model, "ist", None)
    if view is not None and ist is not None and ist.streams:
        raise ValueError("the ISTModel's global model is streamed (ISTConfig(global_view='stream'), or 'auto' with a "
                         "model built on the meta device): its BatchNorm statistics cannot be recomputed, since each "
                         "module is dropped after its forward; use global_view='gather'")
    return view if view is not None else model


def norms_in_call_order(model: nn.Module, inputs: Any) -> list[_BatchNorm]:
    """The BatchNorm layers with running statistics that one forward of ``inputs`` reaches,
    in the order it reaches them."""
    order: list[_BatchNorm] = []

    def seen(module: nn.Module, args: Any) -> None:
        if module not in order:
            order.append(module)

    handles = [m.register_forward_pre_hook(seen) for m in model.modules()
               if isinstance(m, _BatchNorm) and m.track_running_stats]
    try:
        with torch.no_grad():
            _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return order


def _measure(model: nn.Module, norm: _BatchNorm, batches: Sequence[Any]) -> torch.Tensor:
    """(per-channel sum, per-channel sum of squares, items per channel) of ``norm``'s input
    over ``batches``, in float64; each forward stops at ``norm``."""
    channels = norm.num_features
    sums = torch.zeros(2 * channels + 1, dtype=torch.float64, device=norm.running_mean.device)

    def grab(module: nn.Module, args: Any) -> None:
        x = args[0].detach().to(torch.float64)
        dims = [0, *range(2, x.dim())]
        sums[:channels] += x.sum(dims)
        sums[channels:-1] += (x * x).sum(dims)
        sums[-1] += x.numel() / channels
        raise _Measured

    handle = norm.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            for inputs in batches:
                with contextlib.suppress(_Measured):
                    _call(model, inputs)
    finally:
        handle.remove()
    return sums


def recompute_batchnorm(model: nn.Module, batches: Sequence[Any], all_reduce: AllReduce | None = None) -> None:
    """Set every BatchNorm's running statistics of ``model`` (an ISTModel after ``.eval()``:
    its global model) to those of its input over ``batches`` on every rank (module
    docstring). A collective when ``all_reduce`` sums over ranks (default: the default
    process group); every rank must pass the same number of batches (at least one). The
    model is left in evaluation mode."""
    if not batches:
        raise ValueError("recompute_batchnorm needs at least one batch of this rank's data, got none")
    all_reduce = all_reduce or default_all_reduce
    module = scored_module(model)
    module.eval()
    for norm in norms_in_call_order(module, batches[0]):
        sums = all_reduce(_measure(module, norm, batches))
        channels, items = norm.num_features, sums[-1]
        mean = sums[:channels] / items
        var = (sums[channels:-1] - items * mean * mean) / (items - 1).clamp_min(1)
        with torch.no_grad():
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var.clamp_min(0))


@contextlib.contextmanager
def recomputed_batchnorm(model: nn.Module, batches: Sequence[Any], all_reduce: AllReduce | None = None
                         ) -> Iterator[nn.Module]:
    """``model`` with :func:`recompute_batchnorm` applied, and the statistics it trained with
    put back on exit (the running statistics are state the training run keeps; only the
    scoring uses the recomputed ones)."""
    norms = [m for m in scored_module(model).modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    kept = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    try:
        recompute_batchnorm(model, batches, all_reduce)
        yield model
    finally:
        with torch.no_grad():
            for m, (mean, var) in zip(norms, kept):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)


__all__ = ["default_all_reduce", "norms_in_call_order", "recompute_batchnorm", "recomputed_batchnorm",
           "scored_module"]
