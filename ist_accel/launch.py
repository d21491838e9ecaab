"""An :class:`~ist_accel.accelerate.ISTAccelerator`'s launch: what is checked before
Accelerate starts (world = S x G, no FSDP, a DeepSpeed config that fits the subnet groups),
the timeout every process group gets (``ISTConfig.sync_timeout``), and the data-parallel
wrappers a run uses: DDP with the Accelerator's settings, and DeepSpeed's view of a subnet group (ZeRO's data-parallel world is the group, not all processes)."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import ISTConfig
from .lifecycle import apply_sync_timeout, exit_with_parent

logger = logging.getLogger(__name__)

SUPPORTED = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.MULTI_NPU,
             DistributedType.MULTI_XPU, DistributedType.MULTI_HPU, DistributedType.DEEPSPEED)


def accelerator_kwargs(ist_config: ISTConfig, dense_warmup_steps: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Check the launch before any process group exists and return the ``Accelerator``
    keyword arguments to start with: a process-group handler that carries ``sync_timeout``
    and, under DeepSpeed, the checked plugin (gloo on a machine without CUDA)."""
    if not isinstance(ist_config, ISTConfig):
        raise TypeError(f"ist_config must be an ist_accel.ISTConfig, got {type(ist_config).__name__}")
    if isinstance(dense_warmup_steps, bool) or not isinstance(dense_warmup_steps, int) or dense_warmup_steps < 0:
        raise ValueError(f"dense_warmup_steps must be an integer >= 0, got {dense_warmup_steps!r}")
    ist_config.check_world_size(int(os.environ.get("WORLD_SIZE", "1")))
    if kwargs.get("fsdp_plugin") is not None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError("ISTAccelerator does not run under FSDP: use a DDP-style launch (DDP inside each "
                         "subnet group) or DeepSpeed ZeRO (partitioned inside each group)")
    kwargs = dict(kwargs)
    handlers = list(kwargs.pop("kwargs_handlers", None) or [])
    backend = None
    plugin = deepspeed_plugin(kwargs)
    if plugin is not None:
        from .zero import check_deepspeed_config

        mixed = kwargs.get("mixed_precision") or os.environ.get("ACCELERATE_MIXED_PRECISION")
        check_deepspeed_config(plugin.deepspeed_config, ist_config.group_size, str(mixed))
        if ist_config.optimizer_state == "local":
            raise ValueError("optimizer_state='local' is not supported under DeepSpeed (ZeRO steps Adam per "
                             "partition, not per tensor): use 'reset' or 'carry'")
        if dense_warmup_steps:
            raise ValueError("dense_warmup_steps is not supported under DeepSpeed yet; warm up without it")
        kwargs["deepspeed_plugin"] = plugin
        if not torch.cuda.is_available():  # Accelerate drops DeepSpeed when cpu=True: gloo on CPU instead
            kwargs.pop("cpu", None)
            os.environ.pop("ACCELERATE_USE_CPU", None)
            backend = "gloo"
    exit_with_parent()  # a launched worker ends with its launcher, never trains on as an orphan
    timeout_handler(handlers, ist_config.sync_timeout, backend)  # fail, not hang, on a stalled peer
    return {**kwargs, "kwargs_handlers": handlers}


def check_launched(distributed_type: DistributedType, num_processes: int, device: torch.device,
                   sync_timeout: float) -> None:
    """After Accelerate started: a supported distributed type, every process in one world
    (a world of one when not launched, so the engine runs unchanged), and ``sync_timeout``
    on every group, the default one included: it may predate the Accelerator
    (TrainingArguments, DeepSpeed, the user's own ``init_process_group``) and then kept its
    own timeout (30 min for gloo)."""
    if distributed_type not in SUPPORTED:
        raise ValueError(f"ISTAccelerator supports distributed types {[t.value for t in SUPPORTED]}, "
                         f"got {distributed_type.value}")
    if num_processes != int(os.environ.get("WORLD_SIZE", "1")):
        raise RuntimeError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but Accelerate runs {num_processes} process(es): "
            "on CPU pass cpu=True (or ACCELERATE_USE_CPU=true) so the ranks join one world")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    apply_sync_timeout(sync_timeout)


def timeout_handler(handlers: list[Any], seconds: float, backend: str | None) -> None:
    """Make sure ``init_process_group`` gets ``seconds`` as its timeout. Accelerate's
    ``InitProcessGroupKwargs.to_kwargs()`` drops a value equal to its own default (600 s when
    the backend field says nccl), and gloo then gets torch's 30 minutes; so the handler's
    ``to_kwargs`` always passes the timeout. A user's own handler keeps its backend and init
    method; ``ISTConfig.sync_timeout`` is the timeout (a different one is overridden, with a warning)."""
    handler = next((h for h in handlers if isinstance(h, InitProcessGroupKwargs)), None)
    timeout = datetime.timedelta(seconds=seconds)
    if handler is None:
        handler = InitProcessGroupKwargs(timeout=timeout, **({"backend": backend} if backend else {}))
        handlers.append(handler)
    elif handler.timeout not in (timeout, InitProcessGroupKwargs(backend=handler.backend).timeout):
        logger.warning("InitProcessGroupKwargs(timeout=%s) is replaced by ISTConfig.sync_timeout=%s s: every process "
                       "group of an IST run uses sync_timeout", handler.timeout, seconds)
    handler.timeout = timeout
    clean = InitProcessGroupKwargs(backend=handler.backend, init_method=handler.init_method, timeout=timeout)

    def with_timeout() -> dict[str, Any]:
        return {**clean.to_kwargs(), "timeout": timeout}

    handler.to_kwargs = with_timeout  # this instance only


def deepspeed_plugin(kwargs: dict[str, Any]) -> DeepSpeedPlugin | None:
    """The DeepSpeed plugin the Accelerator would build (argument or ``accelerate launch``
    environment), built early so its config can be checked before any process group."""
    plugin = kwargs.get("deepspeed_plugin")
    if isinstance(plugin, dict):
        raise ValueError("ISTAccelerator takes one DeepSpeedPlugin (one model per run), not a dict of plugins")
    if plugin is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        plugin = DeepSpeedPlugin()
    return plugin


def wrap_in_ddp(module: nn.Module, accelerator: Accelerator, process_group: Any = None,
                **defaults: Any) -> DistributedDataParallel:
    """``module`` under DDP with the accelerator's DDP settings (``defaults`` where it sets
    none), over ``process_group`` (default: all ranks)."""
    kwargs = accelerator.ddp_handler.to_kwargs() if accelerator.ddp_handler is not None else {}
    for key, value in defaults.items():
        kwargs.setdefault(key, value)
    device_ids = [accelerator.device.index] if accelerator.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, process_group=process_group, **kwargs)


@contextlib.contextmanager
def deepspeed_in_groups(topology: Any, group_size: int) -> Iterator[None]:
    """Inside Accelerate's DeepSpeed preparation (which fills the config's "auto" values),
    hand ``deepspeed.initialize`` the group topology and the group's batch size: ZeRO's
    data-parallel world is the subnet group, not all processes. (Accelerate has no seam
    for DeepSpeed's ``mpu``, so ``deepspeed.initialize`` is wrapped for this call only.)"""
    import deepspeed

    original = deepspeed.initialize

    def initialize(**kwargs: Any) -> Any:
        config = dict(kwargs["config_params"])
        config["train_batch_size"] = (config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
                                      * group_size)
        return original(**{**kwargs, "config_params": config, "mpu": topology})

    deepspeed.initialize = initialize
    try:
        yield
    finally:
        deepspeed.initialize = original


__all__ = ["SUPPORTED", "accelerator_kwargs", "check_launched", "deepspeed_in_groups", "deepspeed_plugin",
           "timeout_handler", "wrap_in_ddp"]
