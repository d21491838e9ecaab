"""What the engine does once, before its first round (IST Alg. 1's initialization): the
ranks agree on the global model's starting values, each rank fills its round-0 subnet and
its group's owner shards from them, mirrors the user's optimizer over the subnet, and
lays the shared set out in one flat buffer that the round end all-reduces in place.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable

import torch
from torch import nn

from .tensors import Piece, state_tensors
from .exchange import Exchange, OwnerShards, value_dtype
from .init import InitialValues, is_meta
from .subnet import SubnetTensors, integer_buffers
from .transfer import FieldSpec, Layout, TransferPlan, located_boxes, owner_rows
from .transport import Transport

logger = logging.getLogger(__name__)

OptimizerLike = torch.optim.Optimizer | Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def engine_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device``, else the model's; for a meta-device model the current CUDA device (or CPU)."""
    if device is None:
        device = next(model.parameters()).device
        if device.type == "meta":
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def mirror_optimizer(optimizer: OptimizerLike, subnet: nn.Module, model: nn.Module, pieces: list[Piece],
                     frozen: set[str]) -> torch.optim.Optimizer:
    """The subnet's optimizer. Given a factory, it is called on the subnet's parameters.
    Given the user's optimizer over the global ``model``, its class, defaults and param
    groups (hyper-parameters, scheduler keys) are mirrored: each subnet parameter joins the
    group of the global parameter it comes from, so a scheduler built on the user's
    optimizer can drive this one group for group. A parameter the user does not optimize
    is frozen (its global name is added to ``frozen``)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer(list(subnet.parameters()))
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    global_params = dict(model.named_parameters())
    source = {p.subnet_name: p.global_name for p in pieces}
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in optimizer.param_groups]
    for name, param in subnet.named_parameters():
        index = group_of.get(id(global_params[source[name]]))
        if index is None:
            param.requires_grad_(False)  # the user does not optimize it: keep it frozen
            frozen.add(source[name])
        else:
            groups[index]["params"].append(param)
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}  # AdamW keeps extra keys
    return type(optimizer)(groups, **defaults)


def marked_frozen(fields: list[FieldSpec], frozen: set[str]) -> list[FieldSpec]:
    """``fields`` with each one's ``frozen`` flag as ``frozen`` says."""
    return [dataclasses.replace(f, frozen=f.name in frozen) for f in fields]


def agree_on_initial_values(transport: Transport, initial_values: InitialValues, model: nn.Module,
                            names: list[str], device: torch.device) -> None:
    """Every rank must start from the same global model. A real model: its checksum is
    compared; only if ranks differ are rank 0's values sent (the whole model, once).
    Meta or checkpoint sources give every rank the same values by construction."""
    digest = torch.tensor([initial_values.digest(names)], dtype=torch.int64, device=device)
    every = transport.exchange_small(digest, "setup")
    if bool((every == every[0]).all()):
        return
    logger.warning("IST: the ranks' initial models differ (seed them alike to save this); rank 0's values are sent")
    tensors = list(state_tensors(model).values())
    transport.broadcast_values(tensors, 0, "setup", value_dtype(t.dtype for t in tensors))


def fill_subnet(subnet: nn.Module, pieces: list[Piece], initial_values: InitialValues, device: torch.device) -> None:
    """This rank's subnet of round 0, from the initial values (allocated here when the
    global model is on the meta device)."""
    if is_meta(subnet):
        subnet.to_empty(device=device)
        for b in integer_buffers(subnet).values():
            b.zero_()
    else:
        subnet.to(device)
    local = state_tensors(subnet)
    with torch.no_grad():
        for piece in pieces:
            local[piece.subnet_name].copy_(initial_values.piece(piece))


def fill_owner_shards(owners: OwnerShards, fields: list[FieldSpec], layouts: dict[str, Layout],
                      initial_values: InitialValues, num_subnets: int, group_index: int) -> None:
    """This group's owner rows of every tensor with elements nobody holds in round 0."""
    S = num_subnets
    for f in fields:
        layout = layouts[f.name]
        if layout.whole:
            continue
        has_owner, _ = located_boxes(layout, S)
        if has_owner:
            lo, hi = owner_rows(f.shape[0], S, group_index)
            values = initial_values.rows(f.name, lo, hi)
            owners.values[f.name] = values.to(owners.device, f.dtype)
            owners.rows[f.name] = (lo, hi)


def flatten_shared(plan: TransferPlan, tensors: SubnetTensors, exchange: Exchange) -> None:
    """Make the subnet's shared tensors views of one flat buffer in the plan's bucket
    order, so the shared set is all-reduced in place: no copy in or out. Only where the
    subnet's storage is live, the wire carries the value dtype, and every shared tensor
    keeps its name and has that dtype."""
    dtype = exchange.values
    if not tensors.live or not plan.shared or exchange.wire != dtype:
        return
    values = tensors.tensors()
    names = [plan.names(i) for i, _, _ in plan.shared]
    if any(now != nxt for now, nxt in names) or any(values[n].dtype != dtype for n, _ in names):
        return
    flat = torch.empty(plan.shared_numel, dtype=dtype, device=exchange.device)
    views = {}
    with torch.no_grad():
        for (name, _), (i, offset, n) in zip(names, plan.shared):
            views[name] = flat[offset : offset + n].view(values[name].shape)
            views[name].copy_(values[name])
        tensors.rebind(views)
    exchange.flat_shared = (flat, tuple((plan.fields[i].name, offset, n) for i, offset, n in plan.shared))


__all__ = ["OptimizerLike", "agree_on_initial_values", "engine_device", "fill_owner_shards", "fill_subnet", "flatten_shared",
           "marked_frozen", "mirror_optimizer"]
