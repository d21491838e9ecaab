"""IST inside an Accelerate training loop: :class:`ISTAccelerator` is an ``Accelerator``
whose ``prepare`` turns (model, optimizer, scheduler) into (subnet, subnet optimizer,
scheduler) and hooks the round (IST Alg. 1; ResIST Alg. 1) onto ``optimizer.step()``.

A loop changes in two lines, the import and the constructor::

    accelerator = ISTAccelerator(ISTConfig(num_subnets=4, local_steps=50))
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, eval_dl, scheduler)
    for x, y in train_dl:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model(x), y))
            optimizer.step(); scheduler.step(); optimizer.zero_grad()
    model.eval()   # every rank: the model now evaluates the averaged global model

Semantics kept from Accelerate: ``accumulate`` counts optimizer steps (a round is
``local_steps`` real steps, whatever the accumulation), ``backward``/``autocast``/mixed
precision, ``clip_grad_norm_``, ``gather_for_metrics``, ``log``, ``save_state`` /
``load_state``. With ``group_size`` G > 1 the subnet is wrapped in DDP over its group
only, or, under a DeepSpeed launch (``distributed_type: DEEPSPEED``), trained by one
DeepSpeed engine per group with ZeRO partitioning inside the group (:mod:`ist_accel.zero`);
IST moves subnets across groups at round ends.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint
from .config import ISTConfig
from .faults import inject, peer_failures, record_failure
from .lifecycle import apply_sync_timeout, exit_with_parent
from .decompose import state_tensors
from .init import is_meta
from .sharded import collect_shards, save_sharded
from .round import IST, RoundMetrics
from .tracking import assignment_image, round_log

logger = logging.getLogger(__name__)

SUPPORTED = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.MULTI_NPU,
             DistributedType.MULTI_XPU, DistributedType.MULTI_HPU, DistributedType.DEEPSPEED)
RANK_STATE = "ist_rank{rank}.pt"
WARMUP_STATE = "ist_warmup.json"


class ISTModel(nn.Module):
    """What :meth:`ISTAccelerator.prepare` returns for the model.

    In training mode it is this rank's subnet (``.subnet``; DDP over the group when G > 1;
    during a data-parallel warm-up, the whole model under DDP over all ranks).
    ``.eval()`` gathers the global model in its evaluation view (all units, eval scaling)
    on every rank, so an unchanged evaluation loop scores the model IST trains; ``.train()``
    drops it again. Like any collective, call ``.eval()`` / ``.train()`` on every rank.
    """

    def __init__(self, ist: IST | None, trained: nn.Module) -> None:
        super().__init__()
        self.subnet = trained
        object.__setattr__(self, "ist", ist)  # not a submodule: parameters() are the subnet's
        object.__setattr__(self, "_global_view", None)
        object.__setattr__(self, "_global_stack", None)
        object.__setattr__(self, "_view_of", None)

    def _engine_state(self) -> tuple[int, int, int]:
        return (self.ist.round, self.ist.steps, self.ist.loads)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training or self._global_view is None:
            return self.subnet(*args, **kwargs)
        return self._global_view(*args, **kwargs)

    def train(self, mode: bool = True) -> ISTModel:
        super().train(mode)
        if mode:
            self.release_global()
            return self
        if self._global_stack is not None and self.ist is not None and self._view_of != self._engine_state():
            self.release_global()  # gathered before the engine moved on (a load, a step): not this model
        if self._global_stack is None and self.ist is not None:  # (warm-up: the model is whole)
            object.__setattr__(self, "_view_of", self._engine_state())
            object.__setattr__(self, "_eval_started", time.perf_counter())
            stack = contextlib.ExitStack()
            view = stack.enter_context(self.ist.eval_global(dst=None))
            view.eval()
            object.__setattr__(self, "_global_stack", stack)
            object.__setattr__(self, "_global_view", view)
        return self

    def release_global(self) -> None:
        """Drop the gathered global model (``.train()`` does this)."""
        if self._global_stack is not None:
            self._global_stack.close()
            object.__setattr__(self, "_global_stack", None)
            object.__setattr__(self, "_global_view", None)
            self.ist.exclude_from_compute(time.perf_counter() - self._eval_started)  # evaluation is not training

    # ---- what a user (or the Trainer) asks of the model it trained ----------------------

    #: methods of the global model that only read it (its weights may be on the meta device)
    FORWARDED_METHODS = frozenset({"num_parameters", "floating_point_ops", "estimate_tokens", "can_generate",
                                   "get_memory_footprint", "create_extended_attention_mask_for_decoder"})

    def __getattr__(self, name: str) -> Any:
        """``PreTrainedModel`` attributes (``config``, ``generation_config``, ``name_or_path``,
        ``_keys_to_ignore_on_save`` ...) and read-only methods (:attr:`FORWARDED_METHODS`) of
        the global model. A method that would act on weights is not forwarded: the global
        model's are not the trained values."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            ist = self.__dict__.get("ist")
            if ist is None or name.startswith("__"):
                raise
            value = getattr(ist.model_global, name)
            if callable(value) and not isinstance(value, nn.Module) and name not in self.FORWARDED_METHODS:
                raise AttributeError(f"ISTModel does not forward {name}() to the global model (it may act on "
                                     f"weights that are not the trained values): call it on the model before "
                                     "prepare(), or on accelerator.eval_global()'s model") from None
            return value

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``generate`` with the global model: after ``.eval()`` (a collective, every rank)."""
        if self._global_view is None:
            raise RuntimeError("ISTModel.generate needs the global model: call model.eval() on every rank first "
                               "(the Trainer's evaluate()/predict() do)")
        return self._global_view.generate(*args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *, export: bool = True,
                        is_main_process: bool | None = None, **ignored: Any) -> None:
        """The global model as ``save_pretrained`` writes it, ``config.json`` and
        ``generation_config.json`` included, but in ``safetensors`` shards written by the
        subnet groups' leaders with a Hugging Face index (never gathered on one rank).
        ``export``: fold the evaluation view into the weights (what ``from_pretrained``
        then scores is what ``.eval()`` scores); ``False`` keeps the raw training values.
        Every rank calls it."""
        if self.ist is None:
            raise RuntimeError("ISTModel.save_pretrained during the data-parallel warm-up: save the whole model "
                               "with accelerator.save_model")
        save_sharded(self.ist, save_directory, export=export)
        if is_main_process is None:
            is_main_process = self.ist.topology.rank == 0
        if is_main_process:
            for part in ("config", "generation_config"):  # what from_pretrained reads beside the weights
                if getattr(self.ist.model_global, part, None) is not None:
                    getattr(self.ist.model_global, part).save_pretrained(save_directory)

    def save_checkpoint(self, save_dir: str, *args: Any, **kwargs: Any) -> bool:
        """What the HF Trainer asks of a DeepSpeed engine at a checkpoint. A group's engine
        holds only its subnet, so nothing is written here: the global model and every rank's
        IST state (subnet, optimizer state, round) are saved beside it by ISTTrainer."""
        return True

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Gradient accumulation without the group's all-reduce (Accelerate calls this)."""
        if isinstance(self.subnet, DistributedDataParallel):
            return self.subnet.no_sync()
        return contextlib.nullcontext()


class ISTAccelerator(Accelerator):
    """An ``Accelerator`` that trains its model with independent subnets.

    Args:
        ist_config: the :class:`~ist_accel.ISTConfig`; the world must be S x G processes.
        example_input: an input for tracing the model, when it is not image-shaped.
        assignment_log_every: log the assignment picture every this many rounds (0: never).
        dense_warmup_steps: first train the whole model data-parallel (DDP over all ranks)
            for this many optimizer steps, then switch to IST (ResIST's ImageNet setting).
        *args, **kwargs: passed to ``Accelerator`` (``mixed_precision``, ``log_with``,
            ``gradient_accumulation_steps``, ``cpu``, ``project_dir`` ...).
    """

    def __init__(
        self,
        ist_config: ISTConfig,
        *args: Any,
        example_input: torch.Tensor | None = None,
        assignment_log_every: int = 1,
        dense_warmup_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(ist_config, ISTConfig):
            raise TypeError(f"ist_config must be an ist_accel.ISTConfig, got {type(ist_config).__name__}")
        ist_config.validate()
        if isinstance(dense_warmup_steps, bool) or not isinstance(dense_warmup_steps, int) or dense_warmup_steps < 0:
            raise ValueError(f"dense_warmup_steps must be an integer >= 0, got {dense_warmup_steps!r}")
        ist_config.check_world_size(int(os.environ.get("WORLD_SIZE", "1")))
        if kwargs.get("fsdp_plugin") is not None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            raise ValueError("ISTAccelerator does not run under FSDP: use a DDP-style launch (DDP inside each "
                             "subnet group) or DeepSpeed ZeRO (partitioned inside each group)")
        handlers = list(kwargs.pop("kwargs_handlers", None) or [])
        backend = None
        plugin = _deepspeed_plugin(kwargs)
        if plugin is not None:  # checked before any process group exists
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
        _timeout_handler(handlers, ist_config.sync_timeout, backend)  # fail, not hang, on a stalled peer
        super().__init__(*args, kwargs_handlers=handlers, **kwargs)
        if self.distributed_type not in SUPPORTED:
            raise ValueError(f"ISTAccelerator supports distributed types {[t.value for t in SUPPORTED]}, "
                             f"got {self.distributed_type.value}")
        if self.num_processes != int(os.environ.get("WORLD_SIZE", "1")):
            raise RuntimeError(
                f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but Accelerate runs {self.num_processes} process(es): "
                "on CPU pass cpu=True (or ACCELERATE_USE_CPU=true) so the ranks join one world")
        if not dist.is_initialized():  # one process: a world of one, so the engine runs unchanged
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        # the default group may predate this Accelerator (TrainingArguments, DeepSpeed, the user's own
        # init_process_group) and then kept its own timeout (30 min for gloo): sync_timeout on every group
        apply_sync_timeout(ist_config.sync_timeout)
        self.ist_config = ist_config
        self.example_input = example_input
        self.assignment_log_every = assignment_log_every
        self.dense_warmup_steps = dense_warmup_steps
        self.ist: IST | None = None
        self.ist_model: ISTModel | None = None
        self.zero_engine: Any = None  # the group's DeepSpeed engine, under DeepSpeed
        self._pending: tuple[nn.Module, torch.optim.Optimizer, Any] | None = None  # (model, optimizer, wrapped) in warm-up
        self._round_logs: list[tuple[dict[str, float], Any]] = []  # IST's round metrics, out with the user's next log
        self._user_logged, self._user_step = False, None

    # ---- prepare -----------------------------------------------------------------

    def prepare(self, *args: Any, device_placement: list[bool] | None = None) -> Any:
        """Like ``Accelerator.prepare``; the one model and its optimizer become the subnet
        and the subnet's optimizer, and a scheduler of that optimizer is re-targeted to it."""
        models = [a for a in args if isinstance(a, nn.Module)]
        if not models:
            return super().prepare(*args, device_placement=device_placement)
        if self.ist_model is not None:
            raise RuntimeError("ISTAccelerator.prepare got a model twice: IST trains one model per run")
        optimizers = [a for a in args if isinstance(a, torch.optim.Optimizer)]
        if len(models) != 1 or len(optimizers) != 1:
            raise ValueError(f"pass exactly one model and its optimizer to prepare(); got {len(models)} model(s) "
                             f"and {len(optimizers)} optimizer(s)")
        model, user_optimizer = models[0], optimizers[0]
        if self.distributed_type == DistributedType.DEEPSPEED:
            return self._prepare_zero(args, model, user_optimizer)
        if self.dense_warmup_steps:
            ist_model, optimizer = self._prepare_warmup(model, user_optimizer)
        else:
            ist_model, optimizer = self._prepare_ist(model, user_optimizer)
        rest = [a for a in args if a is not model and a is not user_optimizer]
        for obj in rest:
            if _is_scheduler(obj) and getattr(obj, "optimizer", None) is user_optimizer and self.ist is not None:
                retarget_scheduler(obj, self.ist.optimizer)
        prepared = super().prepare(*rest) if rest else ()
        prepared = iter(prepared if len(rest) != 1 else (prepared,))
        result = tuple(ist_model if a is model else optimizer if a is user_optimizer else next(prepared) for a in args)
        apply_sync_timeout(self.ist_config.sync_timeout)  # groups created while preparing, too
        return result if len(result) > 1 else result[0]

    def _prepare_ist(self, model: nn.Module, user_optimizer: torch.optim.Optimizer) -> tuple[ISTModel, Any]:
        meta = is_meta(model)  # built on the meta device: it stays there, a rank materializes only its pieces
        if not meta:
            model.to(self.device)
        placeholder = nn.Module() if meta else model  # replaced by the subnet right below
        ist_model = self.prepare_model(ISTModel(None, placeholder), evaluation_mode=True)  # autocast, placement
        self.ist_model = ist_model
        self._start_ist(model, user_optimizer)
        return ist_model, self.prepare_optimizer(self.ist.optimizer)

    def _prepare_zero(self, args: tuple, model: nn.Module, user_optimizer: torch.optim.Optimizer) -> Any:
        """Under DeepSpeed: one engine per subnet group, built once over the subnet and its
        mirrored optimizer, with ZeRO's data-parallel world = the group (``mpu``)."""
        from .zero import ZeroSubnet

        if not is_meta(model):
            model.to(self.device)
        self.ist_model = ISTModel(None, model)
        self._start_ist(model, user_optimizer)
        topology = self.ist.topology.for_deepspeed()
        rest = [a for a in args if a is not model and a is not user_optimizer]
        for obj in rest:
            if _is_scheduler(obj) and getattr(obj, "optimizer", None) is user_optimizer:
                retarget_scheduler(obj, self.ist.optimizer)
        with _deepspeed_in_groups(topology, self.ist_config.group_size):
            engine, optimizer, *prepared = super().prepare(self.ist.subnet, self.ist.optimizer, *rest)
        self.zero_engine = engine
        self.ist.hand_over(ZeroSubnet(engine))
        self.ist_model.subnet = engine
        self._models[self._models.index(engine)] = self.ist_model  # the run's model is the IST model
        prepared = iter(prepared)
        result = tuple(self.ist_model if a is model else optimizer if a is user_optimizer else next(prepared) for a in args)
        apply_sync_timeout(self.ist_config.sync_timeout)  # DeepSpeed's own groups, too
        return result if len(result) > 1 else result[0]

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Accelerate's ``backward``; under DeepSpeed the engine steps in it, so the step is
        counted here (elsewhere an optimizer hook counts it)."""
        super().backward(loss, **kwargs)
        if self.zero_engine is not None and self.sync_gradients:
            self.ist.step_done()

    def _prepare_warmup(self, model: nn.Module, user_optimizer: torch.optim.Optimizer) -> tuple[ISTModel, Any]:
        """Whole model, DDP over all ranks, the user's own optimizer, until the switch."""
        if is_meta(model):
            raise ValueError("dense_warmup_steps trains the whole model on every rank: build it on a real device, not "
                             "on meta (or warm up without IST first)")
        model.to(self.device)
        trained: nn.Module = model
        if self.num_processes > 1:
            kwargs = self.ddp_handler.to_kwargs() if self.ddp_handler is not None else {}
            trained = DistributedDataParallel(model, device_ids=self._device_ids(), **kwargs)
        ist_model = self.prepare_model(ISTModel(None, trained), evaluation_mode=True)
        self.ist_model = ist_model
        optimizer = self.prepare_optimizer(user_optimizer)
        hook = user_optimizer.register_step_post_hook(self._count_warmup_step)
        self._pending = (model, user_optimizer, optimizer, hook)
        self._warmup_done = 0
        logger.info("IST: %d data-parallel warm-up steps before IST", self.dense_warmup_steps)
        return ist_model, optimizer

    def _count_warmup_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._warmup_done += 1
        if self._warmup_done >= self.dense_warmup_steps:
            self._switch_to_ist()

    def _switch_to_ist(self) -> None:
        """End the warm-up: the same prepared objects now train subnets."""
        model, user_optimizer, accelerated, hook = self._pending
        hook.remove()
        self._pending = None
        self._start_ist(model, user_optimizer)
        user_optimizer.state.clear()  # the whole model's momentum is not carried into subnets
        accelerated.optimizer = self.ist.optimizer
        for scheduler in self._schedulers:
            if getattr(scheduler.scheduler, "optimizer", None) is user_optimizer:
                retarget_scheduler(scheduler.scheduler, self.ist.optimizer)
        logger.info("IST: warm-up done, switched to %d subnets", self.ist_config.num_subnets)

    def _start_ist(self, model: nn.Module, user_optimizer: torch.optim.Optimizer) -> None:
        model_params = sum(p.numel() for p in model.parameters())
        self.ist = IST(model, user_optimizer, self.ist_config, example_input=self.example_input, reduce_gradients=False,
                       device=self.device)
        trained: nn.Module = self.ist.model
        if self.ist.intra is not None and self.distributed_type != DistributedType.DEEPSPEED:  # DDP in the group
            kwargs = self.ddp_handler.to_kwargs() if self.ddp_handler is not None else {}
            kwargs.setdefault("broadcast_buffers", False)  # buffers are averaged at round ends
            trained = DistributedDataParallel(trained, device_ids=self._device_ids(), process_group=self.ist.intra,
                                              **kwargs)
        self.ist_model.subnet = trained
        object.__setattr__(self.ist_model, "ist", self.ist)
        self.ist.on_sync.append(self._log_round)
        logger.info("IST: rank %d trains subnet %d (%d of %d parameters)", self.process_index, self.ist.group_index,
                    self.ist.subnet_numel(), model_params)

    def _device_ids(self) -> list[int] | None:
        return [self.device.index] if self.device.type == "cuda" else None

    @property
    def in_warmup(self) -> bool:
        """True while the data-parallel warm-up runs (before the switch to IST)."""
        return self._pending is not None

    # ---- the global model ------------------------------------------------------------

    @contextlib.contextmanager
    def eval_global(self) -> Iterator[nn.Module]:
        """The global model in its evaluation view on every rank (a collective)."""
        with self._engine().eval_global(dst=None) as view:
            view.eval()
            yield view

    def get_state_dict(self, model: nn.Module, unwrap: bool = True, raw: bool = False) -> dict[str, torch.Tensor]:
        """For the IST model: the global model's state dict, gathered from the subnets (call
        on every rank, as ``save_model`` and ``save_state`` do), with the evaluation view
        folded into its weights (:meth:`Decomposition.export_state`): loaded into the plain
        architecture it scores what ``model.eval()`` scores. ``raw=True``: the training
        values as they are (what ``save_state`` checkpoints, so a resume is exact)."""
        if not isinstance(model, ISTModel):
            return super().get_state_dict(model, unwrap=unwrap)
        if self.ist is None:  # warm-up: the whole model is here, trained as it is evaluated
            return self._pending[0].state_dict()
        every_node = self.project_configuration.save_on_each_node
        state = self._engine().gather_state(dst=None if every_node else 0) or {}
        if state and not raw:
            state = self.ist.decomposition.export_state(state)
        return state

    # ---- checkpoints ---------------------------------------------------------------

    def save_model(self, model: nn.Module, save_directory: str | os.PathLike, max_shard_size: int | str = "10GB",
                   safe_serialization: bool = True) -> None:
        """For the IST model: the global model with its evaluation view folded in, written
        in ``safetensors`` shards by the subnet groups' leaders plus a Hugging Face index
        (:mod:`ist_accel.sharded`), never put together on one rank. Every rank calls it."""
        if not isinstance(model, ISTModel) or self.ist is None:
            return super().save_model(model, save_directory, max_shard_size=max_shard_size,
                                      safe_serialization=safe_serialization)
        save_sharded(self.ist, save_directory, export=True)

    def save_state(self, output_dir: str | None = None, safe_serialization: bool = True, **kwargs: Any) -> str:
        """Accelerate's checkpoint (the gathered global model, schedulers, samplers, RNG
        states, grad scaler) plus, per rank, ``ist_rank<r>.pt``: round, step, subnet,
        optimizer state and owner shards, which resume the run exactly.

        Atomic: written into ``<dir>.partial``, then ``MANIFEST.json`` (sizes and SHA-256 of
        every file), then renamed to ``<dir>``; a crash midway leaves earlier checkpoints
        as they were. Needs a folder all ranks see (a shared file system across nodes)."""
        if self.ist_model is None:
            return super().save_state(output_dir, safe_serialization, **kwargs)
        final = Path(output_dir) if output_dir is not None else self._next_automatic_checkpoint()
        partial = checkpoint.partial_path(final)
        failure: Exception | None = None
        if self.is_main_process:
            try:
                if partial.exists():
                    shutil.rmtree(partial)  # left by an earlier crash
                partial.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                failure = error
        self._agree_saved(failure, partial, final)  # (a barrier)
        # Every collective first (the global model, under ZeRO-3 the subnet), then only writes: a
        # rank that fails to write (a full disk) cannot leave the others waiting in a collective.
        if self.ist is None:  # inside the data-parallel warm-up
            step, info, rank_state = self._warmup_done, {"phase": "warmup"}, None
        else:
            step, info = self.ist.steps, {"phase": "ist", "round": self.ist.round}
            rank_state = self.ist.state_dict()
        # the global model, raw (the resume is exact), in shards its groups' leaders write
        shards = collect_shards(self.ist, export=False) if self.ist is not None else None
        automatic = self.project_configuration.automatic_checkpoint_naming
        self.project_configuration.automatic_checkpoint_naming = False  # the folder is ours to name
        try:
            with self._hidden(models=shards is not None, optimizers=True):
                super().save_state(str(partial), safe_serialization, **kwargs)
            if shards is not None:
                shards.write(partial)
            if rank_state is None:
                if self.is_main_process:
                    (partial / WARMUP_STATE).write_text(json.dumps({"warmup_steps_done": self._warmup_done}))
            else:
                torch.save(rank_state, partial / RANK_STATE.format(rank=self.process_index))
            inject("save", self.process_index, step)
        except Exception as error:  # OSError, or torch.save's / safetensors' own error on a full disk
            failure = error
        finally:
            self.project_configuration.automatic_checkpoint_naming = automatic
        self._agree_saved(failure, partial, final)
        if self.is_main_process:
            try:
                checkpoint.write_manifest(partial, {**info, "step": step, "world_size": self.num_processes})
                checkpoint.publish(partial, final)
                if automatic:
                    self._prune_automatic_checkpoints()
            except OSError as error:
                failure = error
        self._agree_saved(failure, partial, final)
        logger.info("IST: saved %s (step %d) to %s", info["phase"], step, final)
        return str(final)

    def _agree_saved(self, failure: Exception | None, partial: Path, final: Path) -> None:
        """A collective in place of a barrier: did every rank write its part? If not, every
        rank raises :class:`~ist_accel.checkpoint.CheckpointSaveError` saying which rank
        failed and why (a full disk, say), and the incomplete ``.partial`` folder is removed;
        earlier checkpoints are untouched."""
        mine = ""
        if failure is not None:
            try:
                left = shutil.disk_usage(final.parent).free
                free = f"; {left} bytes free on {final.parent}'s file system" + (
                    ": the disk is full" if left < 1 << 20 else "")
            except OSError:
                free = ""
            mine = f"rank {self.process_index}: {type(failure).__name__}: {failure}{free}"
            record_failure(f"saving checkpoint {final} failed: {type(failure).__name__}: {failure}{free}")
        flags = torch.zeros(self.num_processes, dtype=torch.int64, device=self.device)
        flags[self.process_index] = int(failure is not None)
        if self.num_processes > 1:
            dist.all_reduce(flags)
        failed = flags.nonzero().flatten().tolist()
        if not failed:
            return
        if self.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        reasons = [mine] if mine else [m for m in peer_failures() if int(m.split(":")[0].split()[1]) in failed]
        error = checkpoint.CheckpointSaveError(
            f"saving checkpoint {final} failed on rank(s) {failed} ({'; '.join(reasons) or 'no reason recorded'}); "
            f"the incomplete {partial.name} was removed and earlier checkpoints are untouched. Free disk space "
            "(or choose another --output-dir) and resume from the last checkpoint")
        own = getattr(failure, "errno", None)
        error.errno = own if own is not None else (errno.ENOSPC if "No space left" in str(reasons) else None)
        raise error from failure

    def load_state(self, input_dir: str | None = None, **kwargs: Any) -> None:
        """Resume from :meth:`save_state`: the same config and world size are required."""
        if self.ist_model is None:
            return super().load_state(input_dir, **kwargs)
        folder = Path(input_dir) if input_dir is not None else self._latest_checkpoint()
        manifest = checkpoint.verify(folder)  # before anything is loaded
        if manifest.get("world_size") != self.num_processes:
            raise checkpoint.CheckpointError(f"{folder} was written by {manifest.get('world_size')} processes, "
                                             f"this run has {self.num_processes}")
        path = folder / RANK_STATE.format(rank=self.process_index)
        if self.ist is None and self._pending is not None:
            if not path.is_file():  # a checkpoint from inside the warm-up
                return self._load_warmup_state(folder, **kwargs)
            self._switch_to_ist()
        if self.ist is None:
            return super().load_state(input_dir, **kwargs)
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {path.name}: not an ISTAccelerator checkpoint, or one "
                                    "written by a different number of processes")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.check_rank_state(state, path)
        self.ist.load_state_dict(state)
        with self._hidden(models=True, optimizers=True):
            super().load_state(str(folder), **kwargs)
        logger.info("IST: resumed at round %d (step %d) from %s", self.ist.round, self.ist.steps, folder)

    def check_rank_state(self, state: Any, path: Path) -> None:
        """Refuse (on every rank alike) a rank state whose subnet or owner-shard tensors have
        other shapes than this run's, naming the tensor and both shapes, before anything is
        loaded (a checkpoint of another ``--hidden`` width, say)."""
        problem = None
        if isinstance(state, dict):
            live = {n: tuple(getattr(t, "ds_shape", t.shape)) for n, t in state_tensors(self.ist.subnet).items()}
            problem = checkpoint.shape_mismatch(state.get("subnet") or {}, live, "subnet")
            owners = getattr(getattr(self.ist, "exchange", None), "owners", None)
            if problem is None and owners is not None:
                shards = {n: tuple(v.shape) for n, v in owners.values.items()}
                problem = checkpoint.shape_mismatch(state.get("owners") or {}, shards, "owner-shard")
        self._refuse_together(problem, path)

    def _refuse_together(self, problem: str | None, path: Path) -> None:
        flags = torch.tensor([int(problem is not None)], dtype=torch.int64, device=self.device)
        if self.num_processes > 1:
            dist.all_reduce(flags)
        if problem is not None:
            raise checkpoint.CheckpointError(f"{path}: {problem}")
        if int(flags.item()):
            raise checkpoint.CheckpointError(f"{path.parent}: another rank's state does not fit this run's model "
                                             "(its error names the tensor and both shapes)")

    def _load_warmup_state(self, folder: Path, **kwargs: Any) -> None:
        from safetensors.torch import load_file

        model = self._pending[0]
        weights = folder / "model.safetensors"
        state = load_file(weights) if weights.is_file() else torch.load(
            folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        live = {n: tuple(t.shape) for n, t in model.state_dict().items()}
        self._refuse_together(checkpoint.shape_mismatch(state, live, "model"), weights)
        model.load_state_dict(state)
        with self._hidden(models=True):
            super().load_state(str(folder), **kwargs)
        self._warmup_done = json.loads((folder / WARMUP_STATE).read_text())["warmup_steps_done"]

    def _automatic_checkpoints(self) -> list[Path]:
        folder = Path(self.project_dir or ".") / "checkpoints"
        found = [p for p in folder.glob("checkpoint_*") if re.fullmatch(r"checkpoint_\d+", p.name)]
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    def _next_automatic_checkpoint(self) -> Path:
        if not self.project_configuration.automatic_checkpoint_naming:
            raise ValueError("save_state needs output_dir (or ProjectConfiguration(automatic_checkpoint_naming=True))")
        return Path(self.project_dir or ".") / "checkpoints" / f"checkpoint_{self.save_iteration}"

    def _prune_automatic_checkpoints(self) -> None:
        limit = self.project_configuration.total_limit
        found = self._automatic_checkpoints()
        for old in found[: -limit] if limit else []:
            shutil.rmtree(old)

    def _latest_checkpoint(self) -> Path:
        found = [p for p in self._automatic_checkpoints() if checkpoint.is_complete(p)]
        if not found:
            raise FileNotFoundError(f"no complete checkpoint_<n> folder in {Path(self.project_dir or '.')}/checkpoints; "
                                    "pass input_dir")
        return found[-1]

    @contextlib.contextmanager
    def _hidden(self, models: bool = False, optimizers: bool = False) -> Iterator[None]:
        """Keep the subnet (whose weights are per rank) out of Accelerate's own files."""
        saved_models, saved_optimizers = list(self._models), list(self._optimizers)
        if models:
            self._models[:] = [m for m in self._models if not isinstance(m, ISTModel)]
        if optimizers and self.ist is not None:
            self._optimizers[:] = [o for o in self._optimizers if o.optimizer is not self.ist.optimizer]
        try:
            yield
        finally:
            self._models[:], self._optimizers[:] = saved_models, saved_optimizers

    # ---- tracking ------------------------------------------------------------------

    def init_trackers(self, project_name: str, config: dict | None = None, init_kwargs: dict | None = None) -> None:
        """Accelerate's ``init_trackers``; the run config also records the IST config."""
        config = {**(config or {}), "ist": self.ist_config.to_dict()}
        super().init_trackers(project_name, config=config, init_kwargs=init_kwargs)

    def log(self, values: dict, step: int | None = None, log_kwargs: dict | None = None) -> None:
        """Accelerate's ``log``. IST's round metrics (``ist/*``, and the assignment picture)
        of the rounds ended since the last call go out first, at the same ``step``: IST
        follows the loop's own step axis, whatever it counts (optimizer steps, epochs, a
        counter that restarts after a resume), so a tracker that refuses steps going
        backwards (W&B) never drops the user's metrics because of IST's."""
        self._flush_round_logs(step)
        self._user_logged, self._user_step = True, step if step is not None else self._user_step
        super().log(values, step=step, log_kwargs=log_kwargs)

    def end_training(self) -> None:
        """Accelerate's ``end_training``; round metrics not logged yet go out first (at the
        loop's last logged step, or IST's step when the loop never logged). A round in
        progress is synced first, so the steps since the last sync reach the global model."""
        if self.ist is not None:
            self.ist.finish()
        if self._round_logs:
            self._flush_round_logs(self._user_step if self._user_logged else (self.ist.steps if self.ist else None))
        super().end_training()

    def _flush_round_logs(self, step: int | None) -> None:
        pending, self._round_logs = self._round_logs, []
        if not self.is_main_process:
            return
        for values, image in pending:
            for tracker in self.trackers:
                tracker.log(values, step=step)
                if image is not None and hasattr(tracker, "log_images") and tracker.name != "tensorboard":
                    tracker.log_images({"ist/assignment": [image]}, step=step)

    def _log_round(self, metrics: RoundMetrics) -> None:
        if not self.trackers or not self.is_main_process:
            return
        values = {**round_log(metrics, self.ist.totals, self.ist.subnet_numel()), "ist/step": self.ist.steps}
        every = self.assignment_log_every
        image = None
        if every and metrics.round % every == 0:
            image = assignment_image(self.ist.decomposition.assignment(metrics.round))
        self._round_logs.append((values, image))  # logged with the loop's next log(), at its step

    def _engine(self) -> IST:
        if self.ist is None:
            raise RuntimeError("call prepare(model, optimizer, ...) first")
        return self.ist


def _timeout_handler(handlers: list[Any], seconds: float, backend: str | None) -> None:
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


def _deepspeed_plugin(kwargs: dict[str, Any]) -> DeepSpeedPlugin | None:
    """The DeepSpeed plugin the Accelerator would build (argument or ``accelerate launch``
    environment), built early so its config can be checked before any process group."""
    plugin = kwargs.get("deepspeed_plugin")
    if isinstance(plugin, dict):
        raise ValueError("ISTAccelerator takes one DeepSpeedPlugin (one model per run), not a dict of plugins")
    if plugin is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        plugin = DeepSpeedPlugin()
    return plugin


@contextlib.contextmanager
def _deepspeed_in_groups(topology: Any, group_size: int) -> Iterator[None]:
    """Inside Accelerate's DeepSpeed preparation (which fills the config's "auto" values),
    hand ``deepspeed.initialize`` the group topology and the group's batch size: ZeRO's
    data-parallel world is the subnet group, not all processes."""
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


def _is_scheduler(obj: Any) -> bool:
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


__all__ = ["ISTAccelerator", "ISTModel"]
