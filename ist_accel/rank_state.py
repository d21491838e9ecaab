"""One rank's part of a checkpoint: what ``IST.state_dict()`` holds, and the checks before
anything of it is loaded.

The state is composed of the engine units' own pieces (the subnet and optimizer state,
the owner shards, the totals, the outer state) around the round counters. It resumes only
the run that wrote it: the same format, config (the sync timeout aside), world, rank,
subnet tensors and shapes; every refusal names what differs. The shape comparison is
:func:`ist_accel.checkpoint.shape_mismatch`, the one the integrations use too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import shape_mismatch
from .decompositions import keep_frozen
from .tensors import state_tensors

if TYPE_CHECKING:
    from .round import IST

STATE_FORMAT = "ist_accel.IST/2"


def subnet_shapes(subnet: nn.Module) -> dict[str, tuple[int, ...]]:
    """Each subnet tensor's whole shape, read without communication (ZeRO-3: ``ds_shape``)."""
    return {n: tuple(getattr(t, "ds_shape", t.shape)) for n, t in state_tensors(subnet).items()}


def shape_problem(state: Mapping[str, Any], subnet: Mapping[str, tuple[int, ...]],
                  owners: Mapping[str, torch.Tensor]) -> str | None:
    """The first subnet or owner-shard tensor of ``state`` whose shape differs from this
    run's, as a sentence naming it and both shapes; None when all fit."""
    problem = shape_mismatch(state.get("subnet") or {}, subnet, "subnet")
    if problem is None:
        shards = {n: tuple(v.shape) for n, v in owners.items()}
        problem = shape_mismatch(state.get("owners") or {}, shards, "owner-shard")
    return problem


def check_rank_state(state: Any, config: dict[str, Any], world_size: int, rank: int,
                     subnet: Mapping[str, tuple[int, ...]], owners: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the first thing by which ``state`` is not this run's
    (``config`` is this run's :meth:`~ist_accel.ISTConfig.to_dict`)."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not an IST rank state of this version (format {found!r}, expected {STATE_FORMAT!r})")
    for key, value in state["config"].items():
        if config.get(key) != value and key != "sync_timeout":
            raise ValueError(f"checkpoint was written with {key}={value!r}, this run has {key}={config.get(key)!r}")
    for key, value in (("world_size", world_size), ("rank", rank)):
        if state[key] != value:
            raise ValueError(f"checkpoint was written with {key}={state[key]}, this run has {key}={value}")
    if set(state["subnet"]) != set(subnet) or not set(owners) <= set(state["owners"]):
        raise ValueError("checkpoint's subnet tensors differ from this run's subnet (another model?)")
    problem = shape_problem(state, subnet, owners)
    if problem is not None:
        raise ValueError(problem)


def rank_state_dict(ist: IST) -> dict[str, Any]:
    """This rank's state of the run ``ist`` (module docstring)."""
    return {"format": STATE_FORMAT, "config": ist.config.to_dict(), "world_size": dist.get_world_size(),
            "rank": ist.rank, "round": ist.round, "steps": ist.steps, "round_steps": ist.round_steps,
            **ist.tensors.state_dict(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in ist.optimizer.param_groups],
            **ist.exchange.owners.state_dict(), **ist.book.state_dict(), **ist.outer_state.state_dict()}


def load_rank_state(ist: IST, state: Any) -> None:
    """Check ``state`` (:func:`check_rank_state`), then put the round counters, the round's
    assignment, and each unit's piece back into ``ist``. The engine then plans the round
    and takes its snapshot (``IST.load_state_dict``)."""
    check_rank_state(state, ist.config.to_dict(), dist.get_world_size(), ist.rank, subnet_shapes(ist.subnet),
                     ist.exchange.owners.values)
    ist.round, ist.steps = state["round"], state["steps"]
    ist.loads += 1  # (views of the global model taken before are stale)
    ist.round_steps = state.get("round_steps", 0)
    ist.assignment = ist.decomposition.assignment(ist.round)
    ist.pieces = ist.decomposition.pieces(ist.assignment, ist.group_index)
    ist.layouts = ist.planner.layouts(ist.assignment)
    keep_frozen(ist.subnet, ist.frozen, ist.pieces)
    ist.tensors.load_state_dict(state)
    for group, saved in zip(ist.optimizer.param_groups, state["param_groups"]):
        group.update(saved)  # learning rates as the scheduler left them
    ist.exchange.owners.load_state_dict(state)
    ist.book.load_state_dict(state)
    ist.outer_state.load_momentum(state)


__all__ = ["STATE_FORMAT", "check_rank_state", "load_rank_state", "rank_state_dict", "shape_problem",
           "subnet_shapes"]
