"""DeepSpeed ZeRO inside each subnet group, IST across the groups.

Each group of G ranks trains its subnet with one DeepSpeed engine, built once per run
(subnets keep their shapes from round to round). ZeRO partitions the fp32 master weights,
gradients and optimizer state over the group's G ranks only: ``deepspeed.initialize`` gets
a topology (:class:`~ist_accel.topology.Topology`, DeepSpeed's ``mpu``) whose data-parallel group is the
subnet group. IST's round end (IST Alg. 1, ResIST Alg. 1) then runs on whole tensors:
:class:`ZeroSubnet` assembles them with DeepSpeed's ``safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state`` and writes the next round's values back with
``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``. The module's own copy
is refreshed too: a plain copy under ZeRO-1/2 (where module parameters are whole on every
rank) and ``GatheredParameters(modifier_rank=0)`` under ZeRO-3 (which re-partitions it).
All of that is collective inside the group only (fast links); across groups only the
subnets move, every ``local_steps`` steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .tensors import state_tensors
from .subnet import SubnetTensors

STAGES = (1, 2, 3)


def check_deepspeed_config(config: Mapping[str, Any], group_size: int, mixed_precision: str | None = None) -> None:
    """Refuse DeepSpeed settings that cannot work with IST, before any process group exists.

    ZeRO must partition inside a subnet group, every optimizer step must be taken by
    every group (a skipped fp16 step would desynchronize the rounds), and the optimizer
    is the user's torch optimizer, mirrored over the subnet."""
    if not isinstance(config, Mapping):
        raise TypeError(f"DeepSpeed config must be a dict (or a JSON file's contents), got {type(config).__name__}")
    zero = config.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    if stage not in STAGES:
        raise ValueError(f"zero_optimization.stage={stage!r}: IST runs ZeRO stage 1, 2 or 3 inside each group "
                         "(without ZeRO, launch without DeepSpeed: the group then trains its subnet under DDP)")
    if config.get("pipeline") or config.get("pipeline_parallel_size", 1) not in (1, None):
        raise ValueError("DeepSpeed pipeline parallelism cannot be combined with IST: a subnet is trained whole "
                         "by its group; remove the 'pipeline' settings")
    tp = (config.get("tensor_parallel") or {}).get("autotp_size", 0) or 0
    if tp > 1:
        raise ValueError(f"tensor_parallel.autotp_size={tp}: IST subnets are not tensor-parallel; use 0 or 1")
    if config.get("sequence_parallel_size", 1) not in (1, None):
        raise ValueError("DeepSpeed sequence parallelism is not supported with IST; remove sequence_parallel_size")
    for key in ("zero_hpz_partition_size", "mics_shard_size"):
        value = zero.get(key)
        if value not in (None, -1, 0, 1) and (not isinstance(value, int) or group_size % value):
            raise ValueError(f"zero_optimization.{key}={value!r} would make ZeRO groups span subnets; "
                             f"it must divide the group size {group_size}")
    fp16 = (config.get("fp16") or {}).get("enabled", False)
    if fp16 is True or mixed_precision == "fp16":
        raise ValueError("fp16 with DeepSpeed skips optimizer steps on overflow, which would put the subnet groups "
                         "out of step; use bf16 (or fp32)")
    if "optimizer" in config:
        raise ValueError("remove the 'optimizer' block from the DeepSpeed config: IST mirrors your torch optimizer "
                         "over each subnet and hands it to DeepSpeed")
    if "scheduler" in config:
        raise ValueError("remove the 'scheduler' block from the DeepSpeed config: pass your torch scheduler to "
                         "prepare(), it is retargeted to the subnet's optimizer")


def _is_zero3(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


class ZeroSubnet(SubnetTensors):
    """The subnet's values as a DeepSpeed engine holds them (partitioned inside the group).

    Every method is collective over the group: all its ranks call them in the same order,
    which IST's round end does."""

    live = False  # tensors() and optimizer_state() assemble copies; write() puts them back

    def __init__(self, engine: Any) -> None:
        super().__init__(engine.module, engine.optimizer)
        self.engine = engine
        # the torch optimizer DeepSpeed steps over the flat fp32 partitions
        self.base = engine.optimizer.optimizer

    @contextlib.contextmanager
    def _gathered(self, params: list[nn.Parameter], modify: bool = False) -> Iterator[None]:
        z3 = [p for p in params if _is_zero3(p)]
        if not z3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(z3, modifier_rank=0 if modify else None):
            yield

    def tensors(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        params = dict(self.module.named_parameters())
        out: dict[str, torch.Tensor] = {}
        frozen = [p for p in params.values() if not p.requires_grad]
        with self._gathered(frozen):
            for name, tensor in state_tensors(self.module).items():
                param = params.get(name)
                if param is None:
                    out[name] = tensor  # buffers are whole and not partitioned
                elif param.requires_grad:
                    out[name] = safe_get_full_fp32_param(param).view(param.ds_shape if _is_zero3(param) else param.shape)
                else:
                    out[name] = param.detach().clone().float()
        return out

    def _link_state(self) -> None:
        """ZeRO-1/2 link each parameter to its optimizer-state fragment once, after the first
        param group's first step, when later groups have no state yet (DeepSpeed 0.19), and
        a loaded state replaces the linked tensors: link them all again before use."""
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state") and self.base.state:
            optimizer._hp_optimizer_states_linked = False
            optimizer._lazy_init_hp_params_optimizer_state()

    def element_state_keys(self) -> list[str]:
        """The optimizer-state keys that travel: per-element entries (a scalar ``step`` is
        the same in every group)."""
        keys = {k for st in self.base.state.values() for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0}
        return sorted(keys)

    def optimizer_state(self, ensure: tuple = ()) -> dict[str, dict[str, Any]]:
        """Whole per-element optimizer state by parameter name, assembled from the group's
        partitions. ``ensure`` is not used: DeepSpeed creates the entries of every trained
        parameter together, at the first step, so none lacks what another has."""
        from deepspeed.utils import safe_get_full_optimizer_state

        self._link_state()
        keys = self.element_state_keys()
        out: dict[str, dict[str, Any]] = {}
        for name, param in self.module.named_parameters():
            if param.requires_grad and keys:
                shape = param.ds_shape if _is_zero3(param) else param.shape
                out[name] = {k: safe_get_full_optimizer_state(param, k).view(shape) for k in keys}
        return out

    def write(self, tensors: dict[str, torch.Tensor], state: dict[str, dict[str, Any]] | None = None) -> None:
        params = dict(self.module.named_parameters())
        buffers = {n: t for n, t in state_tensors(self.module).items() if n not in params}
        updated = {n: params[n] for n in tensors if n in params}
        with torch.no_grad():
            for name, value in tensors.items():
                if name in buffers:
                    buffers[name].copy_(value)
                elif params[name].requires_grad:
                    _set_master(params[name], value)
            with self._gathered(list(updated.values()), modify=True):  # the module's copy (ZeRO-3: re-partitioned)
                for name, param in updated.items():
                    param.data.copy_(tensors[name].view_as(param.data).to(param.dtype))
        if state is None:
            return
        self._link_state()
        keys = self.element_state_keys()
        for name, entries in state.items():
            for key, value in entries.items():
                if key in keys:
                    _set_master(params[name], value, key)

    def reset_optimizer_state(self) -> None:
        """Zeroing the state in place equals a fresh one for SGD (no dampening) and Adam(W):
        their first step from zeros computes what their first step from nothing does."""
        with torch.no_grad():
            for st in self.base.state.values():
                for value in st.values():
                    if torch.is_tensor(value):
                        value.zero_()

    def state_dict(self) -> dict[str, Any]:
        """The whole subnet, and this rank's partition of the optimizer state as DeepSpeed's
        torch optimizer holds it (a resumed run has the same groups and partitions)."""
        return {"subnet": {n: t.detach().clone() for n, t in self.tensors().items()},
                "optimizer_partition": self.base.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "optimizer_partition" not in state:
            raise ValueError("this IST checkpoint was not written under DeepSpeed: resume it without DeepSpeed")
        self.write(state["subnet"])
        self.base.load_state_dict(state["optimizer_partition"])
        self._link_state()

    def optimizer_state_elements(self) -> int:
        """Optimizer-state elements this rank holds (its ZeRO partition)."""
        return sum(v.numel() for st in self.base.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())

    def _resident(self) -> list[torch.Tensor]:
        """The tensors this rank holds: its parameters (ZeRO-3: its partition), buffers, fp32
        master partitions (gradients are freed between steps) and optimizer-state partition."""
        out = [getattr(p, "ds_tensor", p) for p in self.module.parameters()] + list(self.module.buffers())
        out += getattr(self.engine.optimizer, "single_partition_of_fp32_groups", None) or getattr(
            self.engine.optimizer, "fp32_partitioned_groups_flat", None) or []
        return out + [v for st in self.base.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()]

    def resident_elements(self) -> int:
        return sum(t.numel() for t in self._resident())

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._resident())


def _set_master(param: nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
    """Write the whole ``value`` into the fp32 master weights (``key``: that optimizer-state
    entry) of ``param``, wherever ZeRO keeps them. Under ZeRO-3 this rank writes its own
    partition with the local API: DeepSpeed 0.19's ``safe_set_full_*`` rejects tensors whose
    size the group does not divide."""
    from deepspeed import utils

    flat = value.detach().float().flatten()
    if not _is_zero3(param):
        utils.safe_set_full_fp32_param(param, flat) if key is None else utils.safe_set_full_optimizer_state(param, flat, key)
        return
    size, group = param.ds_tensor.numel(), param.ds_process_group
    padded = torch.nn.functional.pad(flat, (0, size * dist.get_world_size(group) - flat.numel()))
    mine = padded.narrow(0, size * dist.get_rank(group), size)
    utils.safe_set_local_fp32_param(param, mine) if key is None else utils.safe_set_local_optimizer_state(param, mine, key)


__all__ = ["ZeroSubnet", "check_deepspeed_config"]
