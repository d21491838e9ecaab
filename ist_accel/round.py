"""The round engine over torch.distributed (IST Alg. 1; ResIST Alg. 1): :class:`IST`, the
facade that ties the engine's units together.

World = S subnet groups x G ranks (:class:`~ist_accel.topology.Topology`); rank ``r``
trains subnet ``r // G``. The user's loop stays ``loss.backward(); optimizer.step();
optimizer.zero_grad()`` on ``ist.model`` and ``ist.optimizer``: optimizer hooks average
gradients inside the group before every step (DDP semantics) and, every ``local_steps``
steps, end the round: a :class:`~ist_accel.guard.RoundGuard` check, then the
:class:`~ist_accel.exchange.Exchange` carries out the round's
:class:`~ist_accel.transfer.TransferPlan` (built ahead by the
:class:`~ist_accel.round_plan.RoundPlanner`), then the next round's plan is built.
Set-up is :mod:`ist_accel.startup`; the outer step's state :mod:`ist_accel.outer_state`;
metrics :mod:`ist_accel.metrics`; reads of the global model :mod:`ist_accel.global_model`
and :mod:`ist_accel.evaluation`; checkpoint checks :mod:`ist_accel.rank_state`. Every
collective goes through the :class:`~ist_accel.transport.Transport`, which also turns a
failed one into :class:`~ist_accel.faults.ISTSyncError`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import ISTConfig
from .decompositions import keep_frozen
from .evaluation import Score, sharded_scores
from .exchange import Exchange, value_dtype
from .faults import inject
from .global_model import GlobalModel, read_current
from .gather_plan import GatherPlan
from .global_view import GlobalView
from .guard import RoundGuard, SkipSnapshot, digest
from .init import InitialValues, MetaInit, ModelValues, is_meta
from .lifecycle import apply_sync_timeout, exit_with_parent
from .metrics import RoundBook, RoundMetrics, Totals
from .outer_state import OuterState
from .preflight import check_setup
from .rank_state import STATE_FORMAT, load_rank_state, rank_state_dict, shape_problem, subnet_shapes
from .round_end import end_round, moves_state, post_check, round_state, take_snapshot
from .round_plan import RoundPlanner, gc_paused
from .startup import (OptimizerLike, agree_on_initial_values, engine_device, fill_owner_shards, fill_subnet,
                      flatten_shared, marked_frozen, mirror_optimizer)
from .subnet import SubnetTensors
from .tensors import state_tensors
from .topology import Topology
from .transfer import FieldSpec
from .transport import Transport


class IST:
    """Independent subnet training over an initialized ``torch.distributed`` world.

    Args:
        model: the global model, identical on every rank (rank 0's values are broadcast).
        optimizer: an optimizer factory ``params -> Optimizer``, or an optimizer built
            over ``model``'s parameters (its class and defaults are reused for the subnet).
        config: the :class:`~ist_accel.ISTConfig`; its world size must be S x G.
        free_global: drop the global model's storage after set-up (a rank then holds only
            its subnet and its owner shard); :meth:`gather_global` brings it back.
        reduce_gradients: average gradients inside the group before each step (G > 1).
            Integrations that wrap the subnet in DDP over the group turn this off.

    Callables appended to :attr:`on_sync` receive each round's :class:`RoundMetrics`.
    """

    STATE_FORMAT = STATE_FORMAT

    def __init__(self, model: nn.Module, optimizer: OptimizerLike, config: ISTConfig, *,
                 example_input: torch.Tensor | None = None, free_global: bool = True, reduce_gradients: bool = True,
                 initial_values: InitialValues | None = None, device: torch.device | str | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("IST needs torch.distributed initialized (torchrun / init_process_group)")
        self.config, S = config, config.num_subnets
        # config, world size and model checked together before any group of ours exists
        self.decomposition = check_setup(model, config, dist.get_world_size(), example_input)
        exit_with_parent()  # a launched worker ends with its launcher
        apply_sync_timeout(config.sync_timeout)  # the default group, whoever created it, fails within the timeout
        self.topology = top = Topology(S, config.group_size, config.sync_timeout)
        self.transport = Transport(top, config.sync_timeout)
        self.rank, self.group_index, self.replica = top.rank, top.group_index, top.replica
        self.is_leader = top.is_leader
        self.intra = top.intra
        self.model_global = model
        self.meta = is_meta(model)  # built on the meta device: no rank ever holds it whole
        if initial_values is None:
            initial_values = MetaInit(model, config.seed) if self.meta else ModelValues(model)
        self.initial_values = initial_values
        self.global_shapes = {n: (t.shape, t.dtype) for n, t in state_tensors(model).items()}
        self.frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        self._model_hash = digest(sorted((n, tuple(sh), str(dt)) for n, (sh, dt) in self.global_shapes.items()))
        self.device = engine_device(model, device)
        self.guard = RoundGuard(self.transport, S, top.group_index, top.rank, config.nonfinite, self.device,
                                lambda: {"world size": dist.get_world_size(), "model": self._model_hash,
                                         "config": int(self.config.fingerprint()[:12], 16)})
        self.steps = self.round = self.round_steps = 0
        self.loads = 0  # load_state_dict() calls: a view of the global model taken before one is stale
        self.assignment = self.decomposition.assignment(0)
        post_check(self, "set-up")()  # another model or config on some rank: ISTAgreementError, never a gloo abort
        agree_on_initial_values(self.transport, self.initial_values, model, list(self.global_shapes), self.device)
        parameters = {n for n, _ in model.named_parameters()}
        fields = [FieldSpec(n, sh, dt, frozen=n in self.frozen, buffer=n not in parameters)
                  for n, (sh, dt) in self.global_shapes.items()]
        self.planner = RoundPlanner(self.decomposition, fields, parameters,
                                    self.group_index, S, self.device)
        self.layouts = self.planner.layouts(self.assignment)
        self.subnet = self.decomposition.build_subnet(self.group_index)
        self.pieces = self.decomposition.pieces(self.assignment, self.group_index)
        fill_subnet(self.subnet, self.pieces, self.initial_values, self.device)
        keep_frozen(self.subnet, self.frozen, self.pieces)
        self.values = value_dtype(dt for _, dt in self.global_shapes.values())
        self.exchange = Exchange(top, self.transport, wire_dtype=config.wire_dtype, device=self.device,
                                 values=self.values, wire_block=config.wire_block, seed=config.seed)
        self.global_view = GlobalView(top, self.transport, self.device, self.values, wire=self.exchange.read_dtype)
        self.optimizer = mirror_optimizer(optimizer, self.subnet, model, self.pieces, self.frozen)
        self.planner.base_fields = marked_frozen(self.planner.base_fields, self.frozen)
        self.tensors: SubnetTensors = SubnetTensors(self.subnet, self.optimizer)
        self.outer = config.outer()  # the round's outer optimizer (ist_accel.outer); plain averaging by default
        self.outer_state = OuterState(self.outer, self.subnet, self.device)
        self._hooks = [self.optimizer.register_step_post_hook(self._after_step)]
        if reduce_gradients and self.intra is not None:
            self._hooks.append(self.optimizer.register_step_pre_hook(self._before_step))
        self.on_sync: list[Callable[[RoundMetrics], None]] = []
        self.free_global = free_global
        self.global_model = GlobalModel(model, self.decomposition, self.global_view, self.exchange.owners,
                                        self.device, free_global, self.meta)
        self.book = RoundBook(self.transport, config.group_size)
        self.planner.prepare(self.round, self.layouts, {}, moves_state(self))
        flatten_shared(self.planner.plan, self.tensors, self.exchange)
        fill_owner_shards(self.exchange.owners, self.planner.base_fields, self.layouts, self.initial_values, S,
                          self.group_index)
        if isinstance(self.initial_values, MetaInit):
            self.initial_values.release()
        self.snapshot: SkipSnapshot | None = None
        take_snapshot(self)
        self.round_started = time.perf_counter()  # (compute seconds of the round count from here)
        if free_global:
            self.release_global()

    # ---- the user-facing pieces ----------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The subnet this rank trains (fixed shape; refilled every round)."""
        return self.subnet

    @property
    def totals(self) -> Totals:
        """The run's sums over its syncs (:class:`~ist_accel.metrics.Totals`)."""
        return self.book.totals

    def hand_over(self, tensors: SubnetTensors) -> None:
        """Let another owner hold the subnet's values (a DeepSpeed engine, which partitions
        them and steps its own optimizer): round ends read and write through ``tensors``,
        and the integration calls :meth:`step_done` after each optimizer step."""
        if self.config.optimizer_state == "local" and not tensors.live:
            raise ValueError("optimizer_state='local' is not supported under DeepSpeed (ZeRO steps Adam per "
                             "partition, not per tensor): use 'reset' or 'carry'")
        self.remove_hooks()
        self.tensors = tensors
        take_snapshot(self)

    def step_done(self) -> None:
        """Count one optimizer step; every ``local_steps`` steps this ends the round."""
        self._after_step(None, (), {})

    def sync(self) -> RoundMetrics:
        """End the round now: average over holders and dispatch the next assignment.

        First, one small all-reduce checks that every rank is at the same round and step
        with the same config, assignment and model, and that no subnet went non-finite
        (policy ``nonfinite``). A failing collective raises :class:`~ist_accel.faults.ISTSyncError`."""
        with self.transport.communication(f"round {self.round} (step {self.steps})"), gc_paused():
            return end_round(self)

    def finish(self) -> RoundMetrics | None:
        """End training: sync a round in progress (the steps since the last sync would
        otherwise never reach the global model). Every rank calls it."""
        return self.sync() if self.round_steps else None

    def subnet_numel(self) -> int:
        """Parameters in this rank's subnet."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.subnet.parameters())  # ZeRO-3: unpartitioned

    def exclude_from_compute(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation inside the round, say) out of the round's compute time."""
        self.round_started += seconds

    def remove_hooks(self) -> None:
        """Detach the engine from its optimizer: no more group gradient averages or round
        ends from ``optimizer.step()`` (nothing else is released)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ---- hooks -----------------------------------------------------------------

    def _before_step(self, optimizer, args, kwargs) -> None:
        self.transport.average([p.grad for p in self.subnet.parameters() if p.grad is not None], "intra", self.intra)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        self.round_steps += 1
        inject("step", self.rank, self.steps, self._lazy_tensors())
        if self.round_steps >= self.config.local_steps:
            self.sync()

    def _lazy_tensors(self) -> Iterator[torch.Tensor]:
        """The subnet's tensors, looked up only if a fault injection iterates them."""
        yield from self.tensors.tensors().values()

    # ---- the global model ---------------------------------------------------------

    def read_current(self) -> tuple[GatherPlan, dict[int, torch.Tensor]]:
        """What every read of the global model starts from (:func:`~ist_accel.global_model.read_current`):
        a collective, called inside the caller's :meth:`Transport.communication`."""
        return read_current(self)

    def gather_state(self, dst: int | None = 0, for_eval: bool = False) -> dict[str, torch.Tensor] | None:
        """The global model's tensors (parameters and float buffers, fresh copies) on rank
        ``dst`` (``None``: every rank), a collective; None on the other ranks. At a round end
        the averaged global model; between syncs, what a sync now would average. Exact, unless
        ``for_eval``: then a round end's pieces travel in the wire dtype, as the exchange's do."""
        with self.transport.communication(f"gathering the global model at step {self.steps}"):
            plan, current = self.read_current()
            return self.global_model.gather_state(plan, current, dst, for_eval)

    def gather_global(self, dst: int | None = 0, for_eval: bool = False) -> nn.Module | None:
        """The global model itself, filled with :meth:`gather_state` on rank ``dst`` (``None``:
        every rank), a collective. Not for a model built on the meta device (no rank holds
        it whole): use :meth:`eval_global` (streamed) or a sharded save."""
        if self.meta:
            raise RuntimeError("the global model was built on the meta device, so it is never put together on one "
                               "rank: evaluate with eval_global()/evaluate() (streamed), save with save_sharded()")
        return self.global_model.fill(self.gather_state(dst, for_eval))

    @property
    def streams(self) -> bool:
        """Whether reads of the global model for evaluation are streamed (one module at a
        time; ``ISTConfig.global_view``, ``"auto"``: when the model was built on meta)."""
        mode = self.config.global_view
        return mode == "stream" or (mode == "auto" and self.meta)

    @contextlib.contextmanager
    def eval_global(self, dst: int | None = None) -> Iterator[nn.Module | None]:
        """The global model in its evaluation view (all units, eval scaling). Streamed
        (:attr:`streams`): every module is gathered just before its forward and dropped
        after, so every rank must run the same forwards; else gathered whole, and its storage
        dropped again on exit when the engine was built with ``free_global``. At a round end
        the pieces travel in the wire dtype (``ISTConfig.wire_dtype``; saves are exact)."""
        if self.streams and dst is None:
            with self.transport.communication(f"reading the global model at step {self.steps}"):
                plan, current = self.read_current()
            with self.global_model.streamed(plan, self.layouts, current, shared_local=self.round_steps == 0) as view:
                yield view
            return
        with self.global_model.eval_view(self.gather_global(dst, for_eval=True)) as view:
            yield view

    def evaluate(self, dataset: Sequence[Any], batch_size: int = 256, score: Score | None = None) -> float:
        """Score the global model on ``dataset`` sharded over all ranks
        (:func:`~ist_accel.evaluation.sharded_scores`): ``score(model, batch)`` returns (sum
        of the metric, number of items); default: top-1 accuracy of ``(x, y)`` batches."""
        totals = sharded_scores(self.eval_global(dst=None), dataset, self.rank, dist.get_world_size(), self.device,
                                batch_size, score)
        with self.transport.communication("evaluating"):
            self.transport.all_reduce(totals, "eval")
        return float(totals[0] / totals[1].clamp_min(1))

    def release_global(self) -> None:
        """Drop the global model's storage (it is gathered again on demand)."""
        self.global_model.release()

    # ---- memory -------------------------------------------------------------------

    def resident_elements(self) -> int:
        """Tensor elements this rank keeps: subnet parameters, gradients, optimizer state,
        buffers, owner shards and whatever remains of the global model."""
        return self.tensors.resident_elements() + self.exchange.owners.numel() + self.global_model.resident_elements()

    def resident_bytes(self) -> dict[str, int]:
        """Bytes this rank keeps, by what for: the subnet's tensors, gradients and optimizer
        state; owner shards; the exchange's reusable buffers; the plans; the ``skip``
        snapshot; what remains of the global model."""
        plan = self.planner.plan
        return {"subnet": self.tensors.resident_bytes(), "owner_shards": self.exchange.owners.nbytes(),
                "buffers": self.exchange.nbytes(), "plans": plan.nbytes() if plan is not None else 0,
                "snapshot": self.snapshot.nbytes() if self.snapshot is not None else 0,
                "global_model": self.global_model.resident_bytes()}

    # ---- checkpoints -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's part of the run (:mod:`ist_accel.rank_state`): round, step, subnet
        tensors, optimizer state and owner shards. Together, the ranks' state dicts resume
        the run exactly."""
        return rank_state_dict(self)

    def shape_mismatch(self, state: dict[str, Any]) -> str | None:
        """The first subnet or owner-shard tensor of a rank ``state`` whose shape differs
        from this run's (a checkpoint of another width, say), as a sentence; None when all
        fit. No communication: integrations check before loading, on every rank."""
        return shape_problem(state, subnet_shapes(self.subnet), self.exchange.owners.values)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` of this rank; the run must have the same config and world."""
        load_rank_state(self, state)
        self.planner.prepare(self.round, self.layouts, round_state(self), moves_state(self))
        take_snapshot(self)
        self.outer_state.load_before(state)  # a checkpoint inside a round
        self.round_started = time.perf_counter()


__all__ = ["IST", "RoundMetrics", "SubnetTensors", "Totals"]
