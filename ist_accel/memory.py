"""What a worker holds in memory, counted from outside the engine.

IST's first promise is memory (arXiv 1910.02120, Sec. 1: "storing only a portion of
network parameters on each device"). These counters do not ask the engine what it keeps:
:func:`live_tensor_bytes` walks every tensor the Python process can reach (the garbage
collector's objects and their gradients), counting each storage once, and
:func:`peak_rss_bytes` reads the kernel's high-water mark of the process. The benchmark
(``benchmarks/memory.py``) compares both with what ``ist-accel plan`` predicts.
"""

from __future__ import annotations

import gc
import resource
import warnings
from collections.abc import Iterable

import torch


def _storages(objects: Iterable[object]) -> dict[int, int]:
    out: dict[int, int] = {}
    for obj in objects:
        if not isinstance(obj, torch.Tensor) or obj.is_meta:
            continue
        for t in (obj, getattr(obj, "grad", None) if obj.is_leaf else None):
            if t is None or t.is_meta:
                continue
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, a functional wrapper)
                continue
            if storage.nbytes():
                out[storage.data_ptr()] = storage.nbytes()
    return out


def live_tensor_bytes(exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of every distinct tensor storage reachable from Python (parameters, their
    gradients, optimizer state, buffers, index plans, anything else), minus the storages of
    ``exclude`` (e.g. an in-memory data set)."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on deprecated module attributes (torch.distributed.reduce_op)
        warnings.simplefilter("ignore", FutureWarning)
        found = _storages(gc.get_objects())
    for ptr in _storages(exclude):
        found.pop(ptr, None)
    return sum(found.values())


def peak_rss_bytes() -> int:
    """The process's peak resident set size (the kernel's ``ru_maxrss``, VmHWM)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dataset_tensors(*datasets: object) -> list[torch.Tensor]:
    """The tensors data set objects hold directly (e.g. ``IdxDataset.images``), also
    through a ``Subset``'s ``dataset``."""
    out: list[torch.Tensor] = []
    for d in datasets:
        while d is not None:
            out += [v for v in vars(d).values() if isinstance(v, torch.Tensor)]
            d = getattr(d, "dataset", None)
    return out


__all__ = ["dataset_tensors", "live_tensor_bytes", "peak_rss_bytes"]
