"""Learning-rate schedulers over the subnet's optimizer: the user's scheduler, built over
the global model's optimizer, re-pointed at the subnet optimizer whose param groups mirror
it one for one (what ``ISTAccelerator.prepare`` and the Trainer route both need)."""

from __future__ import annotations

import functools
from typing import Any

import torch


def is_scheduler(obj: Any) -> bool:
    return isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau))


def retarget_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Point a scheduler (and those it chains) at the subnet's optimizer, whose param
    groups mirror the user's one for one, and keep torch's check that ``step()`` ran."""
    for s in (scheduler, *getattr(scheduler, "_schedulers", ())):
        s.optimizer = optimizer
    step = optimizer.step
    if not hasattr(step, "_wrapped_by_lr_sched"):

        @functools.wraps(step)
        def tracked(*args: Any, **kwargs: Any) -> Any:
            optimizer._opt_called = True
            return step(*args, **kwargs)

        tracked._wrapped_by_lr_sched = True
        optimizer.step = tracked


__all__ = ["is_scheduler", "retarget_scheduler"]
