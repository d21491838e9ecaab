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

The pieces: :mod:`ist_accel.launch` (checks and process-group timeouts around Accelerate's
launch), :mod:`ist_accel.ist_model` (the model ``prepare`` returns), :mod:`ist_accel.warmup`
(the optional data-parallel warm-up), :mod:`ist_accel.atomic_state` (``save_state`` /
``load_state``) and :class:`ist_accel.tracking.RoundLogQueue` (round metrics to trackers).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from .atomic_state import RANK_STATE, AtomicState
from .config import ISTConfig
from .init import is_meta
from .ist_model import ISTModel
from .launch import accelerator_kwargs, check_launched, deepspeed_in_groups, wrap_in_ddp
from .lifecycle import apply_sync_timeout
from .metrics import RoundMetrics
from .round import IST
from .schedulers import is_scheduler, retarget_scheduler
from .sharded import save_sharded
from .tracking import RoundLogQueue
from .warmup import DenseWarmup

logger = logging.getLogger(__name__)


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
        super().__init__(*args, **accelerator_kwargs(ist_config, dense_warmup_steps, kwargs))
        check_launched(self.distributed_type, self.num_processes, self.device, ist_config.sync_timeout)
        self.ist_config = ist_config
        self.example_input = example_input
        self.dense_warmup_steps = dense_warmup_steps
        self.ist: IST | None = None
        self.ist_model: ISTModel | None = None
        self.zero_engine: Any = None  # the group's DeepSpeed engine, under DeepSpeed
        self.warmup: DenseWarmup | None = None
        self.round_logs = RoundLogQueue(assignment_log_every)  # out with the user's next log()
        self.checkpoints = AtomicState(self)

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
        rest = [a for a in args if a is not model and a is not user_optimizer]
        schedulers = [a for a in rest if is_scheduler(a) and getattr(a, "optimizer", None) is user_optimizer]
        if self.distributed_type == DistributedType.DEEPSPEED:
            optimizer, prepared = self._prepare_zero(model, user_optimizer, rest, schedulers)
        else:
            if self.dense_warmup_steps:
                self.warmup, self.ist_model, optimizer = DenseWarmup.prepare(
                    self, self.dense_warmup_steps, model, user_optimizer, schedulers, self._start_ist)
            else:
                optimizer = self._prepare_ist(model, user_optimizer, schedulers)
            prepared = super().prepare(*rest) if rest else ()
            prepared = prepared if len(rest) != 1 else (prepared,)
        apply_sync_timeout(self.ist_config.sync_timeout)  # the groups created while preparing (engine, DeepSpeed)
        prepared = iter(prepared)
        result = tuple(self.ist_model if a is model else optimizer if a is user_optimizer else next(prepared)
                       for a in args)
        return result if len(result) > 1 else result[0]

    def _prepare_ist(self, model: nn.Module, user_optimizer: torch.optim.Optimizer, schedulers: list[Any]) -> Any:
        meta = is_meta(model)  # built on the meta device: it stays there, a rank materializes only its pieces
        if not meta:
            model.to(self.device)
        placeholder = nn.Module() if meta else model  # replaced by the subnet right below
        self.ist_model = self.prepare_model(ISTModel(None, placeholder), evaluation_mode=True)  # autocast, placement
        return self.prepare_optimizer(self._start_ist(model, user_optimizer, schedulers))

    def _prepare_zero(self, model: nn.Module, user_optimizer: torch.optim.Optimizer, rest: list[Any],
                      schedulers: list[Any]) -> tuple[Any, list[Any]]:
        """Under DeepSpeed: one engine per subnet group, built once over the subnet and its
        mirrored optimizer, with ZeRO's data-parallel world = the group (``mpu``)."""
        from .zero import ZeroSubnet

        if not is_meta(model):
            model.to(self.device)
        self.ist_model = ISTModel(None, model)
        self._start_ist(model, user_optimizer, schedulers)
        with deepspeed_in_groups(self.ist.topology.for_deepspeed(), self.ist_config.group_size):
            engine, optimizer, *prepared = super().prepare(self.ist.subnet, self.ist.optimizer, *rest)
        self.zero_engine = engine
        self.ist.hand_over(ZeroSubnet(engine))
        self.ist_model.subnet = engine
        # Accelerate listed the engine among its models and would write the engine's own checkpoint (one
        # group's subnet) in save_state; the run's model is the IST model, whose engine checkpoint declines
        # (ISTModel.decline_engine_checkpoint). Accelerate offers no public way to replace a prepared model.
        self._models[self._models.index(engine)] = self.ist_model
        return optimizer, prepared

    def _start_ist(self, model: nn.Module, user_optimizer: torch.optim.Optimizer,
                   schedulers: list[Any]) -> torch.optim.Optimizer:
        """Build the round engine and train its subnet (under DDP over the group when G > 1,
        outside DeepSpeed); ``schedulers`` of the user's optimizer follow the subnet's,
        which this returns."""
        model_params = sum(p.numel() for p in model.parameters())
        self.ist = IST(model, user_optimizer, self.ist_config, example_input=self.example_input, reduce_gradients=False,
                       device=self.device)
        trained: nn.Module = self.ist.model
        if self.ist.intra is not None and self.distributed_type != DistributedType.DEEPSPEED:  # DDP in the group
            trained = wrap_in_ddp(trained, self, process_group=self.ist.intra,
                                  broadcast_buffers=False)  # buffers are averaged at round ends
        self.ist_model.attach(self.ist, trained)
        self.ist.on_sync.append(self._log_round)
        for scheduler in schedulers:
            retarget_scheduler(scheduler, self.ist.optimizer)
        logger.info("IST: rank %d trains subnet %d (%d of %d parameters)", self.process_index, self.ist.group_index,
                    self.ist.subnet_numel(), model_params)
        return self.ist.optimizer

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Accelerate's ``backward``; under DeepSpeed the engine steps in it, so the step is
        counted here (elsewhere an optimizer hook counts it)."""
        super().backward(loss, **kwargs)
        if self.zero_engine is not None and self.sync_gradients:
            self.ist.step_done()

    @property
    def in_warmup(self) -> bool:
        """True while the data-parallel warm-up runs (before the switch to IST)."""
        return self.warmup is not None and self.warmup.warming

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps trained so far, a warm-up's included (automatic checkpoint names count them)."""
        if self.in_warmup:
            return self.warmup.steps_done
        return (self.dense_warmup_steps if self.warmup is not None else 0) + (self.ist.steps if self.ist else 0)

    # ---- the global model ------------------------------------------------------------

    @contextlib.contextmanager
    def eval_global(self, dst: int | None = None) -> Iterator[nn.Module | None]:
        """The global model in its evaluation view on every rank (a collective), or on rank
        ``dst`` only (None elsewhere): each rank then sends its part once, and only ``dst``
        receives what it lacks (fewer bytes; ``dst`` scores alone). The time inside is left out
        of the round's compute time, as ``model.eval()`` does."""
        engine, started = self._engine(), time.perf_counter()
        try:
            with engine.eval_global(dst=dst) as view:
                if view is not None:
                    view.eval()
                yield view
        finally:
            engine.exclude_from_compute(time.perf_counter() - started)

    def get_state_dict(self, model: nn.Module, unwrap: bool = True, raw: bool = False) -> dict[str, torch.Tensor]:
        """For the IST model: the global model's state dict, gathered from the subnets (call
        on every rank, as ``save_model`` does), with the evaluation view folded into its
        weights (:meth:`Decomposition.export_state`): loaded into the plain architecture it
        scores what ``model.eval()`` scores. ``raw=True``: the training values as they are.
        (Inside ``save_state`` nothing is gathered: the checkpoint writes the model as shards.)"""
        if not isinstance(model, ISTModel):
            return super().get_state_dict(model, unwrap=unwrap)
        if self.checkpoints.writing_shards:
            return {}
        if self.ist is None:  # warm-up: the whole model is here, trained as it is evaluated
            return self.warmup.model.state_dict()
        every_node = self.project_configuration.save_on_each_node
        state = self._engine().gather_state(dst=None if every_node else 0) or {}
        if state and not raw:
            state = self.ist.decomposition.export_state(state)
        return state

    def save_model(self, model: nn.Module, save_directory: str | os.PathLike, max_shard_size: int | str = "10GB",
                   safe_serialization: bool = True) -> None:
        """For the IST model: the global model with its evaluation view folded in, written
        in ``safetensors`` shards by the subnet groups' leaders plus a Hugging Face index
        (:mod:`ist_accel.sharded`), never put together on one rank. Every rank calls it."""
        if not isinstance(model, ISTModel) or self.ist is None:
            return super().save_model(model, save_directory, max_shard_size=max_shard_size,
                                      safe_serialization=safe_serialization)
        save_sharded(self.ist, save_directory, export=True)

    # ---- checkpoints (ist_accel.atomic_state) ------------------------------------------

    def save_state(self, output_dir: str | None = None, safe_serialization: bool = True, **kwargs: Any) -> str:
        """Accelerate's checkpoint plus the global model's shards and, per rank,
        ``ist_rank<r>.pt`` (round, step, subnet, optimizer state, owner shards): an exact
        resume. Atomic (``<dir>.partial``, ``MANIFEST.json``, rename); without ``output_dir``
        and with automatic naming, ``checkpoints/step_<n>`` under the project folder. Needs
        a folder all ranks see (a shared file system across nodes)."""
        if self.ist_model is None:
            return super().save_state(output_dir, safe_serialization, **kwargs)
        save = functools.partial(Accelerator.save_state, self, safe_serialization=safe_serialization, **kwargs)
        return self.checkpoints.save(output_dir, save)

    def load_state(self, input_dir: str | None = None, **kwargs: Any) -> None:
        """Resume from :meth:`save_state` (default: the latest complete checkpoint under the
        project folder): the same config and world size are required."""
        if self.ist_model is None:
            return super().load_state(input_dir, **kwargs)
        self.checkpoints.load(input_dir, functools.partial(Accelerator.load_state, self, **kwargs))

    def check_rank_state(self, state: Any, path: Any) -> None:
        """Refuse, on every rank alike, a rank state of another model (its error names the
        tensor and both shapes) before anything is loaded."""
        self.checkpoints.check_rank_state(state, path)

    # ---- tracking ------------------------------------------------------------------

    def init_trackers(self, project_name: str, config: dict | None = None, init_kwargs: dict | None = None) -> None:
        """Accelerate's ``init_trackers``; the run config also records the IST config."""
        config = {**(config or {}), "ist": self.ist_config.to_dict()}
        super().init_trackers(project_name, config=config, init_kwargs=init_kwargs)

    def log(self, values: dict, step: int | None = None, log_kwargs: dict | None = None) -> None:
        """Accelerate's ``log``. IST's round metrics (``ist/*``, and the assignment picture)
        of the rounds ended since the last call go out first, at the same ``step``
        (:class:`~ist_accel.tracking.RoundLogQueue`)."""
        self.round_logs.flush(self.trackers, step, self.is_main_process)
        self.round_logs.user_log(step)
        super().log(values, step=step, log_kwargs=log_kwargs)

    def end_training(self) -> None:
        """Accelerate's ``end_training``; round metrics not logged yet go out first (at the
        loop's last logged step, or IST's step when the loop never logged). A round in
        progress is synced first, so the steps since the last sync reach the global model."""
        if self.ist is not None:
            self.ist.finish()
        if self.round_logs.pending:
            queue = self.round_logs
            step = queue.user_step if queue.user_logged else (self.ist.steps if self.ist else None)
            queue.flush(self.trackers, step, self.is_main_process)
        super().end_training()

    def _log_round(self, metrics: RoundMetrics) -> None:
        if self.trackers and self.is_main_process:
            self.round_logs.add(metrics, self.ist.totals, self.ist.subnet_numel(), self.ist.steps,
                                self.ist.decomposition.assignment)

    def _engine(self) -> IST:
        if self.ist is None:
            raise RuntimeError("call prepare(model, optimizer, ...) first")
        return self.ist


__all__ = ["RANK_STATE", "ISTAccelerator", "ISTModel"]
