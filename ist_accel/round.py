"""The round engine over torch.distributed (IST Alg. 1; ResIST Alg. 1).

World = S subnet groups x G ranks (:class:`~ist_accel.topology.Topology`); rank ``r``
trains subnet ``r // G``. The user's loop stays ``loss.backward(); optimizer.step();
optimizer.zero_grad()`` on ``ist.model`` and ``ist.optimizer``: optimizer hooks average
gradients inside the group before every step (DDP semantics) and, every ``local_steps``
steps, end the round: a :class:`~ist_accel.guard.RoundGuard` check, then the
:class:`~ist_accel.exchange.Exchange` carries out the round's
:class:`~ist_accel.transfer.TransferPlan` (built ahead, during the round), then the next
round's plan is built. :class:`IST` is the facade that ties these together; the global
model is put together on demand by :class:`~ist_accel.global_view.GlobalView`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import ISTConfig
from .decompose import Assignment, keep_frozen, kept_tensors, state_tensors
from .exchange import Exchange, Timings, value_dtype
from .faults import ISTError, inject, is_communication_error, peer_failures, sync_failure
from .global_view import GlobalView, streamed
from .guard import PHASES, RoundGuard, all_finite, clone_state
from .lifecycle import apply_sync_timeout, exit_with_parent
from .outer import MOMENTUM_KEY
from .preflight import check_setup
from .subnet import SubnetTensors
from .topology import Topology
from .init import InitialValues, MetaInit, ModelValues, is_meta
from .transfer import FieldSpec, Layout, TransferPlan, build_plan, layouts, located_boxes, owner_rows
from .transport import Transport

logger = logging.getLogger(__name__)

OptimizerLike = torch.optim.Optimizer | Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class RoundMetrics:
    """What one synchronization moved and cost, for this rank. ``bytes_*`` are the
    round's exchange (shared set and messages); ``other_bytes_sent`` everything else this
    rank sent since the previous sync (agreement checks, gathers for evaluation or saving,
    set-up). Seconds: ``sync_seconds`` = check + pack + wire + unpack; ``plan_seconds``
    building the next round's plan (after the sync, outside ``sync_seconds``)."""

    round: int
    bytes_sent: int
    bytes_received: int
    bytes_lower: float
    allreduce_bytes: int
    intra_group_bytes: int
    sync_seconds: float
    compute_seconds: float
    plan_seconds: float = 0.0
    check_seconds: float = 0.0
    pack_seconds: float = 0.0
    wire_seconds: float = 0.0
    unpack_seconds: float = 0.0
    other_bytes_sent: float = 0.0


@dataclass
class Totals:
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_lower: float = 0.0
    sync_seconds: float = 0.0
    compute_seconds: float = 0.0
    rounds: int = 0
    history: list[RoundMetrics] = field(default_factory=list)
    ledger: dict[str, tuple[float, float]] = field(default_factory=dict)  # every byte, by kind (transport.KINDS)


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

    STATE_FORMAT = "ist_accel.IST/2"

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerLike,
        config: ISTConfig,
        *,
        example_input: torch.Tensor | None = None,
        free_global: bool = True,
        reduce_gradients: bool = True,
        initial_values: InitialValues | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        config.validate()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("IST needs torch.distributed initialized (torchrun / init_process_group)")
        self.config = config
        # config, world size and model checked together before any group of ours exists
        self.decomposition = check_setup(model, config, dist.get_world_size(), example_input)
        exit_with_parent()  # a launched worker ends with its launcher
        apply_sync_timeout(config.sync_timeout)  # the default group, whoever created it, fails within the timeout
        self.topology = Topology(config.num_subnets, config.group_size, config.sync_timeout)
        self.transport = Transport(self.topology)
        top = self.topology
        self.rank, self.group_index, self.replica, self.is_leader = top.rank, top.group_index, top.replica, top.is_leader
        self.intra = top.intra
        self.model_global = model
        self.meta = is_meta(model)  # built on the meta device: no rank ever holds it whole
        if initial_values is None:
            initial_values = MetaInit(model, config.seed) if self.meta else ModelValues(model)
        self.initial_values = initial_values
        self.global_shapes = {n: (t.shape, t.dtype) for n, t in state_tensors(model).items()}
        self.frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        self._model_hash = _digest(sorted((n, tuple(sh), str(dt)) for n, (sh, dt) in self.global_shapes.items()))
        if device is None:
            device = next(model.parameters()).device
            if device.type == "meta":
                device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.guard = RoundGuard(self.transport, config.num_subnets, top.group_index, top.rank, config.nonfinite,
                                self.device)
        self.steps = self.round = self.round_steps = 0
        self.loads = 0  # load_state_dict() calls: a view of the global model taken before one is stale
        self.assignment = self.decomposition.assignment(0)
        self._check("set-up")  # another model or config on some rank: ISTAgreementError, never a gloo abort
        self._agree_on_initial_values(model)
        self.base_fields = [FieldSpec(n, sh, dt, frozen=n in self.frozen) for n, (sh, dt) in self.global_shapes.items()]
        self.layouts = self._layouts(self.assignment)
        self.subnet = self.decomposition.build_subnet(self.group_index)
        self.pieces = self.decomposition.pieces(self.assignment, self.group_index)
        self._fill_subnet()
        keep_frozen(self.subnet, self.frozen, self.pieces)
        self.values = value_dtype(dt for _, dt in self.global_shapes.values())
        self.exchange = Exchange(top, self.transport, wire_dtype=config.wire_dtype, device=self.device, values=self.values)
        self.global_view = GlobalView(top, self.transport, self.device, self.values)
        self.optimizer = self._make_optimizer(optimizer)
        self.tensors: SubnetTensors = SubnetTensors(self.subnet, self.optimizer)
        self.outer = config.outer()  # the round's outer optimizer (ist_accel.outer); plain averaging by default
        self.outer_momentum: dict[str, torch.Tensor] = {}  # per subnet parameter; travels with its unit
        if self.outer.has_momentum:
            self.outer_momentum = {n: torch.zeros_like(p, device=self.device) for n, p in self.subnet.named_parameters()}
        self._hooks = [self.optimizer.register_step_post_hook(self._after_step)]
        if reduce_gradients and self.intra is not None:
            self._hooks.append(self.optimizer.register_step_pre_hook(self._before_step))
        self.on_sync: list[Callable[[RoundMetrics], None]] = []
        self.free_global = free_global
        self.totals = Totals()
        self._plan: TransferPlan | None = None
        self._plan_seconds = self._prepare_plan({})
        self._flatten_shared()
        self._init_owner_shards()
        if isinstance(self.initial_values, MetaInit):
            self.initial_values.release()
        self._warned_round = -1
        self._ledger_at_sync = self.transport.ledger.copy()
        self._take_snapshot()
        self._round_started = time.perf_counter()
        if free_global:
            self.release_global()

    # ---- the user-facing pieces ----------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The subnet this rank trains (fixed shape; refilled every round)."""
        return self.subnet

    def hand_over(self, tensors: SubnetTensors) -> None:
        """Let another owner hold the subnet's values (a DeepSpeed engine, which partitions
        them and steps its own optimizer): round ends read and write through ``tensors``,
        and the integration calls :meth:`step_done` after each optimizer step."""
        if self.config.optimizer_state == "local" and not tensors.live:
            raise ValueError("optimizer_state='local' is not supported under DeepSpeed (ZeRO steps Adam per "
                             "partition, not per tensor): use 'reset' or 'carry'")
        self.close()
        self.tensors = tensors
        self._take_snapshot()

    def step_done(self) -> None:
        """Count one optimizer step; every ``local_steps`` steps this ends the round."""
        self._after_step(None, (), {})

    def sync(self) -> RoundMetrics:
        """End the round now: average over holders and dispatch the next assignment.

        First, one small all-reduce checks that every rank is at the same round and step
        with the same config, assignment and model, and that no subnet went non-finite
        (policy ``nonfinite``). A failing collective raises :class:`~ist_accel.faults.ISTSyncError`."""
        with self._communication(f"round {self.round} (step {self.steps})"), _gc_paused():
            return self._sync()

    def finish(self) -> RoundMetrics | None:
        """End training: sync a round in progress (the steps since the last sync would
        otherwise never reach the global model). Every rank calls it."""
        return self.sync() if self.round_steps else None

    def subnet_numel(self) -> int:
        """Parameters in this rank's subnet."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.subnet.parameters())  # ZeRO-3: unpartitioned

    def exclude_from_compute(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation inside the round, say) out of the round's compute time."""
        self._round_started += seconds

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ---- the round ----------------------------------------------------------------

    def _sync(self) -> RoundMetrics:
        compute = time.perf_counter() - self._round_started
        start = time.perf_counter()
        carry = self.config.optimizer_state == "carry"
        state = self._round_state()
        fields = self._fields(state)
        verdict = self._start_check("sync", fields)  # the flags travel while this rank packs
        if self.intra is not None:
            self._average_buffers_in_group()
        plan_seconds = self._plan_seconds
        if self._plan is None or self._plan.fields != fields:
            plan_seconds += self._prepare_plan(state)  # the first round under carry: optimizer state appeared
            start += plan_seconds - self._plan_seconds  # planning is not part of the sync
        plan = self._plan
        values = self.tensors.tensors()
        current, targets = self._contributions(plan, values, state)
        timings = Timings()
        packed = self.exchange.pack(plan, current)
        timings.pack = time.perf_counter() - start
        check_started = time.perf_counter()
        if verdict():  # policy skip: this group's update is dropped; pack its round-start values again
            self._restore_snapshot()
            state = self._round_state()
            values = self.tensors.tensors()
            current, targets = self._contributions(plan, values, state)
            packed = self.exchange.pack(plan, current)
        check = time.perf_counter() - check_started
        self.exchange.finish(plan, packed, targets, timings)
        inject("sync", self.rank, self.steps)
        following = self._assignment(self.round + 1)
        next_pieces = self.decomposition.pieces(following, self.group_index)
        if not self.tensors.live:
            self.tensors.write(values, self._inner(state) if carry else None)
        if self.config.optimizer_state == "local":
            self.tensors.keep_optimizer_state(kept_tensors(self.pieces, next_pieces))
        elif not carry:
            self.tensors.reset_optimizer_state()
        sync_seconds = time.perf_counter() - start
        self.assignment, self.pieces, self.layouts = following, next_pieces, plan.next
        keep_frozen(self.subnet, self.frozen, self.pieces)
        self.round += 1
        self.round_steps = 0
        metrics = self._metrics(plan, timings, check, sync_seconds, compute, plan_seconds)
        self._take_snapshot()
        self._plan_seconds = self._prepare_plan(state)  # round r+1 -> r+2, ahead of its sync
        for callback in self.on_sync:
            callback(metrics)
        self._round_started = time.perf_counter()
        return metrics

    def _metrics(self, plan: TransferPlan, timings: Timings, check: float, sync_seconds: float, compute: float,
                 plan_seconds: float) -> RoundMetrics:
        ledger = self.transport.ledger.copy()
        before = self._ledger_at_sync

        def delta(kind: str, i: int) -> float:
            return ledger.get(kind, (0.0, 0.0))[i] - before.get(kind, (0.0, 0.0))[i]

        shared = delta("shared", 0)
        sent, received = delta("exchange", 0) + shared, delta("exchange", 1) + delta("shared", 1)
        other = sum(delta(k, 0) for k in ledger if k not in ("shared", "exchange"))
        esize = torch.tensor([], dtype=self.exchange.wire).element_size()
        lower = plan.bound_sent * esize / self.config.group_size
        metrics = RoundMetrics(self.round - 1, int(sent), int(received), lower, int(shared), int(delta("intra", 0)),
                               sync_seconds, compute, plan_seconds, check, timings.pack, timings.wire, timings.unpack,
                               other)
        self._ledger_at_sync = ledger
        t = self.totals
        t.bytes_sent += metrics.bytes_sent
        t.bytes_received += metrics.bytes_received
        t.bytes_lower += lower
        t.sync_seconds += sync_seconds
        t.compute_seconds += compute
        t.rounds += 1
        t.history.append(metrics)
        t.ledger = ledger
        return metrics

    def _fields(self, state: dict[str, dict[str, Any]]) -> list[FieldSpec]:
        """Every tensor that travels this round: parameters and float buffers, then (policy
        ``carry``) one field per optimizer-state entry of each trained parameter."""
        fields = list(self.base_fields)
        keys = self._state_keys(state) if self.config.optimizer_state == "carry" or self.outer_momentum else ()
        for f in self.base_fields:
            if f.name in self.frozen or f.name not in self._param_names:
                continue
            for key, scalar in keys:
                fields.append(FieldSpec(f"{f.name}:{key}", torch.Size([]) if scalar else f.shape,
                                        torch.float32 if scalar else f.dtype, source=f.name, scalar=scalar))
        return fields

    @staticmethod
    def _state_keys(state: dict[str, dict[str, Any]]) -> tuple[tuple[str, bool], ...]:
        """Tensor-valued optimizer-state keys (and whether each is a scalar), in a fixed
        order. Derived from this rank's state; the agreement check confirms every rank has
        the same field list."""
        keys: dict[str, bool] = {}
        for st in state.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and k not in keys:
                    keys[k] = v.dim() == 0
        return tuple(sorted(keys.items()))

    @property
    def _keys(self) -> tuple[tuple[str, bool], ...]:
        """The optimizer-state keys the current plan moves (the outer momentum is not one)."""
        fields = self._plan.fields if self._plan is not None else []
        return tuple(sorted({(f.name.rpartition(":")[2], f.scalar) for f in fields if f.source} - {(MOMENTUM_KEY, False)}))

    def _round_state(self) -> dict[str, dict[str, Any]]:
        """What travels besides values: the optimizer state (``carry``) and the outer momentum."""
        state = self.tensors.optimizer_state(self._keys) if self.config.optimizer_state == "carry" else {}
        for name, momentum in self.outer_momentum.items():  # new entries: the optimizer's own stay as they are
            state[name] = {**state.get(name, {}), MOMENTUM_KEY: momentum}
        return state

    @staticmethod
    def _inner(state: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """``state`` without the outer momentum: the optimizer's own."""
        inner = {n: {k: v for k, v in st.items() if k != MOMENTUM_KEY} for n, st in state.items()}
        return {n: st for n, st in inner.items() if st}

    def _outer_contributions_of(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of this group's parameters turned into their outer-step contributions (a read
        of the global model mid-round sees the model a sync now would produce)."""
        copies = {n: values[n].detach().clone() for n in self._outer_before}
        self._turn_into_contributions(copies, momentum=None)
        return copies

    def _contributions(self, plan: TransferPlan, values: dict[str, torch.Tensor], state: dict[str, dict[str, Any]]):
        """:meth:`_bind`, after this group's values and outer momentum are turned, in place,
        into its outer-step contributions, whose average over holders the exchange writes
        back: each tensor is its own target, as the exchange expects."""
        if not self.outer.is_plain_average:
            self._turn_into_contributions(values, self.outer_momentum)
        return self._bind(plan, values, state)

    def _turn_into_contributions(self, values: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor] | None) -> None:
        """In place: each trained parameter in ``values`` becomes its outer-step contribution;
        given ``momentum``, each one's outer-momentum contribution is written into it
        (``ist_accel.outer``)."""
        params = dict(self.subnet.named_parameters())
        for name, before in self._outer_before.items():
            if params[name].requires_grad:  # a frozen unit keeps its value
                w = self.outer.contribute(values[name], before, self.outer_momentum.get(name))
                if w is not None and momentum is not None:
                    momentum[name].copy_(w)

    def _assignment(self, round_: int) -> Assignment:
        """The decomposition's assignment of ``round_`` (kept for the round ahead: the plan
        and the sync both need it)."""
        cached = getattr(self, "_assignment_cache", None)
        if cached is None or cached.round != round_:
            cached = self._assignment_cache = self.decomposition.assignment(round_)
        return cached

    def _layouts(self, assignment: Assignment) -> dict[str, Layout]:
        d, S = self.decomposition, self.config.num_subnets
        return layouts(self.base_fields, [d.pieces(assignment, s) for s in range(S)])

    def _prepare_plan(self, state: dict[str, dict[str, Any]]) -> float:
        """Build the plan of the coming round end (round ``r -> r+1``); returns its seconds."""
        start = time.perf_counter()
        with _gc_paused():
            fields = self._fields(state)
            following = self._layouts(self._assignment(self.round + 1))
            self._plan = build_plan(fields, self.layouts, following, self.group_index, self.config.num_subnets,
                                    self.round)
            self._plan.to(self.device)
        return time.perf_counter() - start

    def _bind(self, plan: TransferPlan, values: dict[str, torch.Tensor], state: dict[str, dict[str, Any]]):
        """Each field's tensor in this group now and next round (values or state entries)."""
        current, targets = {}, {}
        for i, f in enumerate(plan.fields):
            now, nxt = plan.names(i)
            key = f.name.partition(":")[2]
            for name, out in ((now, current), (nxt, targets)):
                if name is not None:
                    out[i] = state[name][key] if key else values[name]
        return current, targets

    @property
    def _param_names(self) -> set[str]:
        names = getattr(self, "_param_name_cache", None)
        if names is None:
            names = self._param_name_cache = {n for n, _ in self.model_global.named_parameters()}
        return names

    # ---- rank agreement and numerical faults --------------------------------------

    def _agreement_fields(self, phase: str, fields: list[FieldSpec] | None = None) -> dict[str, int]:
        return {  # the most basic first: the first field that differs is the one reported
            "phase": PHASES[phase],
            "world size": dist.get_world_size(),
            "model": self._model_hash,
            "config": int(self.config.fingerprint()[:12], 16),
            "round": self.round,
            "step": self.steps,
            "assignment": int(self.assignment.digest()[:12], 16),
            "fields": _digest([(f.name, tuple(f.shape)) for f in fields]) if fields is not None else 0,
        }

    def _check(self, phase: str, fields: list[FieldSpec] | None = None) -> bool:
        """The agreement check (and, at a sync, the non-finite verdict on this subnet and,
        under ``carry``, its optimizer state); True if this group must drop its update of
        the round (policy ``skip``)."""
        return self._start_check(phase, fields)()

    def _start_check(self, phase: str, fields: list[FieldSpec] | None = None) -> Callable[[], bool]:
        """:meth:`_check` posted; call the result to wait for the verdict."""
        ok = True
        if phase == "sync":
            values = list(self.tensors.tensors().values())
            if self.config.optimizer_state == "carry":
                values += [v for st in self.tensors.optimizer_state().values() for v in st.values()
                           if isinstance(v, torch.Tensor)]
            ok = all_finite(values)
        pending = self.guard.start(self._agreement_fields(phase, fields), finite=ok)
        return lambda: self.guard.verdict(pending(), f"round {self.round} (step {self.steps})")

    def _take_snapshot(self) -> None:
        """Policy ``skip`` keeps the round's starting values (a subnet's worth of memory); an
        outer optimizer, the starting values of the parameters (its ``before``)."""
        self._outer_before = {}
        if not self.outer.is_plain_average:
            values = self.tensors.tensors()
            self._outer_before = {n: values[n].detach().clone() for n, _ in self.subnet.named_parameters()}
        if self.config.nonfinite != "skip":
            self._snapshot = None
            return
        self._snapshot = ({n: t.detach().clone() for n, t in self.tensors.tensors().items()},
                          clone_state(self.tensors.optimizer_state()),
                          {n: m.clone() for n, m in self.outer_momentum.items()})

    def _restore_snapshot(self) -> None:
        """Drop this group's update of the round: back to the values it started with."""
        tensors, state, momentum = self._snapshot
        self.tensors.write(tensors, clone_state(state))
        for name, value in momentum.items():
            self.outer_momentum[name].copy_(value)

    # ---- the global model ---------------------------------------------------------

    def _read_current(self) -> tuple[Any, dict[int, torch.Tensor]]:
        """Before any read of the global model: the agreement check, a warning mid-round,
        and this group's current tensor of each field (the replicas' statistics averaged)."""
        self._check("read")
        if self.round_steps and self._warned_round != self.round:
            self._warned_round = self.round
            logger.warning("IST: the global model is read %d steps into round %d (step %d): it is the average a "
                           "sync now would produce; the round goes on", self.round_steps, self.round, self.steps)
        plan = self.global_view.plan(self.round, self.base_fields, self.layouts)
        values = self.tensors.tensors()
        if self.intra is not None and self.round_steps:  # the group's replicas differ in their statistics
            values = {**values, **self._buffers_averaged_in_group(values)}
        if self.round_steps and not self.outer.is_plain_average:  # what a sync now would send: the outer step's
            values = {**values, **self._outer_contributions_of(values)}  # contributions, on copies
        current = {}
        for i, f in enumerate(plan.fields):
            name = self.layouts[f.param].subnet_names.get(self.group_index)
            if name is not None:
                current[i] = values[name]
        return plan, current

    def gather_state(self, dst: int | None = 0) -> dict[str, torch.Tensor] | None:
        """The global model's tensors (parameters and float buffers, fresh copies) on rank
        ``dst`` (``None``: every rank), a collective; None on the other ranks. At a round end
        the averaged global model; between syncs, what a sync now would average."""
        with self._communication(f"gathering the global model at step {self.steps}"):
            plan, current = self._read_current()
            out = {i: torch.empty(f.shape, dtype=f.dtype, device=self.device) for i, f in enumerate(plan.fields)}
            received = self.global_view.gather(plan, current, self.exchange.owners.values, out, dst)
        if not received:
            return None
        state = {f.name: out[i] for i, f in enumerate(plan.fields)}
        for name, b in self.model_global.named_buffers():  # integer buffers stay as the global model has them
            if not b.is_floating_point():
                state[name] = torch.zeros(b.shape, dtype=b.dtype) if b.is_meta else b.detach().clone()
        first: dict[int, str] = {}
        for name, p in self.model_global.named_parameters(remove_duplicate=False):  # tied names share the value
            first.setdefault(id(p), name)
            if name not in state and first[id(p)] in state:
                state[name] = state[first[id(p)]]
        return {name: state[name] for name in self.model_global.state_dict() if name in state} | state

    def gather_global(self, dst: int | None = 0) -> nn.Module | None:
        """The global model itself, filled with :meth:`gather_state` on rank ``dst`` (``None``:
        every rank), a collective. Not for a model built on the meta device (no rank holds
        it whole): use :meth:`eval_global` (streamed) or a sharded save."""
        if self.meta:
            raise RuntimeError("the global model was built on the meta device, so it is never put together on one "
                               "rank: evaluate with eval_global()/evaluate() (streamed), save with save_sharded()")
        state = self.gather_state(dst)
        if state is None:
            if self.free_global:
                self.release_global()
            return None
        live = state_tensors(self.model_global)
        with torch.no_grad():
            for name, value in state.items():
                if name in live:  # (integer buffers and tied names are left as they are)
                    live[name].data = value
        return self.model_global

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
        dropped again on exit when the engine was built with ``free_global``."""
        if self.streams and dst is None:
            with self._communication(f"reading the global model at step {self.steps}"):
                plan, current = self._read_current()
            with streamed(self.global_view, self.model_global, plan.fields, self.layouts, current,
                          self.exchange.owners.values, shared_local=self.round_steps == 0) as model, \
                    self.decomposition.eval_view(model) as view:
                yield view
            return
        model = self.gather_global(dst)
        try:
            if model is None:
                yield None
            else:
                with self.decomposition.eval_view(model) as view:
                    yield view
        finally:
            if self.free_global:
                self.release_global()

    def evaluate(
        self,
        dataset: Sequence[Any],
        batch_size: int = 256,
        score: Callable[[nn.Module, Any], tuple[float, int]] | None = None,
    ) -> float:
        """Score the global model on ``dataset`` sharded over all ranks: rank ``r`` scores
        items ``r, r + N, ...``; the sums are all-reduced. ``score(model, batch)`` returns
        (sum of the metric, number of items); default: top-1 accuracy of ``(x, y)`` batches.
        Every rank runs the same number of batches (a rank short of items repeats its last
        batch, not counted), as a streamed model needs."""
        score = score or _accuracy_counts
        world = dist.get_world_size()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        shard = torch.utils.data.Subset(dataset, range(self.rank, len(dataset), world))
        loader = torch.utils.data.DataLoader(shard, batch_size=batch_size)
        batches = -(-(-(-len(dataset) // world)) // batch_size)  # of the largest shard
        with self.eval_global(dst=None) as model, torch.no_grad():
            last = None
            for batch in loader:
                value, count = score(model, _to_device(batch, self.device))
                totals += torch.tensor([value, count], dtype=torch.float64, device=self.device)
                batches, last = batches - 1, batch
            for _ in range(batches if last is not None else 0):  # keep in step with the ranks that have more
                score(model, _to_device(last, self.device))
        with self._communication("evaluating"):
            self.transport.all_reduce(totals, "eval")
        return float(totals[0] / totals[1].clamp_min(1))

    def release_global(self) -> None:
        """Drop the global model's storage (it is gathered again on demand). A meta-device
        model holds none."""
        with torch.no_grad():
            for t in state_tensors(self.model_global).values():
                if not t.is_meta:
                    t.data = torch.empty(0, dtype=t.dtype)

    # ---- memory -------------------------------------------------------------------

    def resident_elements(self) -> int:
        """Tensor elements this rank keeps: subnet parameters, gradients, optimizer state,
        buffers, owner shards and whatever remains of the global model."""
        n = self.tensors.resident_elements()
        n += self.exchange.owners.numel()
        n += sum(t.numel() for t in state_tensors(self.model_global).values() if not t.is_meta)
        return n

    def resident_bytes(self) -> dict[str, int]:
        """Bytes this rank keeps, by what for: the subnet's tensors, gradients and optimizer
        state; owner shards; the exchange's reusable buffers; the plans; the ``skip``
        snapshot; what remains of the global model."""
        snapshot = 0
        if self._snapshot is not None:
            tensors, state, momentum = self._snapshot
            snapshot = sum(t.numel() * t.element_size() for t in (*tensors.values(), *momentum.values()))
            snapshot += sum(v.numel() * v.element_size() for st in state.values() for v in st.values()
                            if isinstance(v, torch.Tensor))
        return {
            "subnet": self.tensors.resident_bytes(),
            "owner_shards": sum(v.numel() * v.element_size() for v in self.exchange.owners.values.values()),
            "buffers": self.exchange.nbytes(),
            "plans": self._plan.nbytes() if self._plan is not None else 0,
            "snapshot": snapshot,
            "global_model": sum(t.numel() * t.element_size() for t in state_tensors(self.model_global).values()
                                if not t.is_meta),
        }

    # ---- checkpoints -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's part of the run: round, step, subnet tensors, optimizer state and
        owner shards. Together, the ranks' state dicts resume the run exactly."""
        return {
            "format": self.STATE_FORMAT,
            "config": self.config.to_dict(),
            "world_size": dist.get_world_size(),
            "rank": self.rank,
            "round": self.round,
            "steps": self.steps,
            "round_steps": self.round_steps,
            **self.tensors.state_dict(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups],
            "owners": {n: v.clone() for n, v in self.exchange.owners.values.items()},
            "owner_rows": {n: list(r) for n, r in self.exchange.owners.rows.items()},
            "totals": dataclasses.asdict(self.totals),
            "outer_momentum": {n: m.clone() for n, m in self.outer_momentum.items()},
            "outer_before": {n: b.clone() for n, b in self._outer_before.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` of this rank; the run must have the same config and world."""
        if not isinstance(state, dict) or state.get("format") != self.STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not an IST rank state of this version (format {found!r}, expected {self.STATE_FORMAT!r})")
        mine = self.config.to_dict()
        for key, value in state["config"].items():
            if mine.get(key) != value and key != "sync_timeout":
                raise ValueError(f"checkpoint was written with {key}={value!r}, this run has {key}={mine.get(key)!r}")
        for key, value in (("world_size", dist.get_world_size()), ("rank", self.rank)):
            if state[key] != value:
                raise ValueError(f"checkpoint was written with {key}={state[key]}, this run has {key}={value}")
        owners = self.exchange.owners
        live = self.tensors.tensors()
        if set(state["subnet"]) != set(live) or not set(owners.values) <= set(state["owners"]):
            raise ValueError("checkpoint's subnet tensors differ from this run's subnet (another model?)")
        for name, value in state["subnet"].items():
            if tuple(value.shape) != tuple(live[name].shape):
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(value.shape)}, this run's subnet has "
                                 f"{tuple(live[name].shape)} (another model width or num_subnets?)")
        self.round, self.steps = state["round"], state["steps"]
        self.loads += 1  # (views of the global model taken before are stale)
        self.round_steps = state.get("round_steps", 0)
        self.assignment = self.decomposition.assignment(self.round)
        self.pieces = self.decomposition.pieces(self.assignment, self.group_index)
        self.layouts = self._layouts(self.assignment)
        keep_frozen(self.subnet, self.frozen, self.pieces)
        self.tensors.load_state_dict(state)
        for group, saved in zip(self.optimizer.param_groups, state["param_groups"]):
            group.update(saved)  # learning rates as the scheduler left them
        for name, value in state["owners"].items():  # optimizer-state shards appear at the first sync
            owners.rows[name] = tuple(state["owner_rows"][name])
            owners.values[name] = value.to(owners.device)
        totals = dict(state["totals"])
        totals["history"] = [RoundMetrics(**m) for m in totals["history"]]
        totals["ledger"] = {k: tuple(v) for k, v in totals.get("ledger", {}).items()}
        self.totals = Totals(**totals)
        for kind, (sent, received) in self.totals.ledger.items():
            self.transport.ledger[kind].sent, self.transport.ledger[kind].received = sent, received
        self._ledger_at_sync = self.transport.ledger.copy()
        if self.outer_momentum and set(state.get("outer_momentum", {})) != set(self.outer_momentum):
            raise ValueError("checkpoint holds no outer momentum for this subnet (written without outer_momentum?)")
        for name, value in state.get("outer_momentum", {}).items():
            self.outer_momentum[name].copy_(value)
        self._plan_seconds = self._prepare_plan(self._round_state())
        self._take_snapshot()
        for name, value in state.get("outer_before", {}).items():  # a checkpoint inside a round
            if name in self._outer_before:
                self._outer_before[name].copy_(value)
        self._round_started = time.perf_counter()

    # ---- hooks -----------------------------------------------------------------

    def _before_step(self, optimizer, args, kwargs) -> None:
        grads = [p.grad for p in self.subnet.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.transport.all_reduce(flat, "intra", group=self.intra)
        flat /= self.config.group_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        self.round_steps += 1
        inject("step", self.rank, self.steps, self._lazy_tensors())
        if self.round_steps >= self.config.local_steps:
            self.sync()

    def _lazy_tensors(self) -> Iterator[torch.Tensor]:
        """The subnet's tensors, looked up only if a fault injection iterates them."""
        yield from self.tensors.tensors().values()

    # ---- set-up --------------------------------------------------------------------

    def _make_optimizer(self, optimizer: OptimizerLike) -> torch.optim.Optimizer:
        """The subnet's optimizer. Given the user's optimizer over the global model, its
        class, defaults and param groups (hyper-parameters, scheduler keys) are mirrored:
        each subnet parameter joins the group of the global parameter it comes from, so a
        scheduler built on the user's optimizer can drive this one group for group."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            return optimizer(list(self.subnet.parameters()))
        group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        global_params = dict(self.model_global.named_parameters())
        source = {p.subnet_name: p.global_name for p in self.pieces}
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in optimizer.param_groups]
        for name, param in self.subnet.named_parameters():
            index = group_of.get(id(global_params[source[name]]))
            if index is None:
                param.requires_grad_(False)  # the user does not optimize it: keep it frozen
                self.frozen.add(source[name])
            else:
                groups[index]["params"].append(param)
        self.base_fields = [dataclasses.replace(f, frozen=f.name in self.frozen) for f in self.base_fields]
        accepted = inspect.signature(type(optimizer).__init__).parameters
        defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}  # AdamW keeps extra keys
        return type(optimizer)(groups, **defaults)

    def _agree_on_initial_values(self, model: nn.Module) -> None:
        """Every rank must start from the same global model. A real model: its checksum is
        compared; only if ranks differ are rank 0's values sent (the whole model, once).
        Meta or checkpoint sources give every rank the same values by construction."""
        names = list(self.global_shapes)
        digest = torch.tensor([self.initial_values.digest(names)], dtype=torch.int64, device=self.device)
        every = self.transport.exchange_small(digest, "setup")
        if bool((every == every[0]).all()):
            return
        logger.warning("IST: the ranks' initial models differ (seed them alike to save this); rank 0's values are sent")
        tensors = list(state_tensors(model).values())
        dtype = value_dtype(t.dtype for t in tensors)
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
        self.transport.broadcast(flat, 0, "setup")
        offset = 0
        with torch.no_grad():
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def _fill_subnet(self) -> None:
        """This rank's subnet of round 0, from the initial values (allocated here when the
        global model is on the meta device)."""
        if is_meta(self.subnet):
            self.subnet.to_empty(device=self.device)
            for module in self.subnet.modules():  # integer buffers (BatchNorm's num_batches_tracked)
                for attr, b in module._buffers.items():
                    if b is not None and not b.is_floating_point():
                        b.zero_()
        else:
            self.subnet.to(self.device)
        local = state_tensors(self.subnet)
        with torch.no_grad():
            for piece in self.pieces:
                local[piece.subnet_name].copy_(self.initial_values.piece(piece))

    def _init_owner_shards(self) -> None:
        """This group's owner rows of every tensor with elements nobody holds in round 0."""
        S = self.config.num_subnets
        for f in self.base_fields:
            layout = self.layouts[f.name]
            if layout.whole:
                continue
            has_owner, _ = located_boxes(layout, S)
            if has_owner:
                lo, hi = owner_rows(f.shape[0], S, self.group_index)
                values = self.initial_values.rows(f.name, lo, hi)
                self.exchange.owners.values[f.name] = values.to(self.device, f.dtype)
                self.exchange.owners.rows[f.name] = (lo, hi)

    def _flatten_shared(self) -> None:
        """Make the subnet's shared tensors views of one flat buffer in the plan's bucket
        order, so the shared set is all-reduced in place: no copy in or out."""
        plan = self._plan
        if not self.tensors.live or not plan.shared or self.exchange.wire != self.values:
            return
        values = self.tensors.tensors()
        names = [plan.names(i) for i, _, _ in plan.shared]
        if any(now != nxt for now, nxt in names) or any(values[n].dtype != self.values for n, _ in names):
            return
        flat = torch.empty(plan.shared_numel, dtype=self.values, device=self.device)
        slots = {name: (store, attr) for name, store, attr in self.tensors._slots.slots}
        with torch.no_grad():
            for (name, _), (i, offset, n) in zip(names, plan.shared):
                view = flat[offset : offset + n].view(values[name].shape)
                view.copy_(values[name])
                store, attr = slots[name]
                if isinstance(store[attr], nn.Parameter):
                    store[attr].data = view
                else:
                    store[attr] = view
        self.exchange.flat_shared = (flat, tuple((plan.fields[i].name, offset, n) for i, offset, n in plan.shared))

    def _buffers_averaged_in_group(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of the subnet's float buffers averaged over the group (as a sync would)."""
        names = [n for n, _ in self.subnet.named_buffers() if n in values]
        if not names:
            return {}
        flat = torch.cat([values[n].reshape(-1) for n in names]).to(self.values)
        self.transport.all_reduce(flat, "intra", group=self.intra)
        flat /= self.config.group_size
        out, offset = {}, 0
        for n in names:
            k = values[n].numel()
            out[n] = flat[offset : offset + k].view_as(values[n]).to(values[n].dtype)
            offset += k
        return out

    def _average_buffers_in_group(self) -> None:
        buffers = [b for b in self.subnet.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = torch.cat([b.reshape(-1) for b in buffers])
        self.transport.all_reduce(flat, "intra", group=self.intra)
        flat /= self.config.group_size
        offset = 0
        for b in buffers:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()

    @contextlib.contextmanager
    def _communication(self, what: str) -> Iterator[None]:
        """A failing collective becomes :class:`~ist_accel.faults.ISTSyncError`, with what a failed peer said."""
        try:
            yield
        except ISTError:
            raise
        except Exception as error:
            if not is_communication_error(error):
                raise
            raise sync_failure(error, self.config.sync_timeout, what, peer_failures()) from error


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: the few thousand short-lived objects of a
    plan or a sync would otherwise trigger full collections of the whole process heap
    (torch, transformers: about a million objects), measured at ~50 ms each here."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _digest(value: Any) -> int:
    return int(hashlib.sha256(repr(value).encode()).hexdigest()[:12], 16)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


def _accuracy_counts(model: nn.Module, batch: Any) -> tuple[float, int]:
    x, y = batch
    return float((model(x).argmax(-1) == y).sum()), len(y)


__all__ = ["IST", "RoundMetrics", "SubnetTensors", "Totals"]
