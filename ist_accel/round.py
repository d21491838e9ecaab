"""The round state machine over torch.distributed (IST Alg. 1; ResIST Alg. 1).

World = S subnet groups x G ranks; rank ``r`` trains subnet ``r // G``. The user's loop
stays ``loss.backward(); optimizer.step(); optimizer.zero_grad()`` on ``ist.model``
and ``ist.optimizer``: optimizer hooks average gradients inside the group before every
step (DDP semantics) and, every ``local_steps`` steps, synchronize across groups: the
round's subnets are averaged over holders and the next round's are dispatched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
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

from .accounting import tensor_bound
from .config import ISTConfig
from .decompose import Assignment, Piece, decompose, load_subnet, state_tensors
from .exchange import CommStats, Exchange, Field, _positions
from .preflight import check_setup
from .faults import ISTAgreementError, ISTError, ISTNonFiniteError, ISTSyncError, inject

logger = logging.getLogger(__name__)

OptimizerLike = torch.optim.Optimizer | Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class RoundMetrics:
    """What one synchronization moved and cost, for this rank."""

    round: int
    bytes_sent: int
    bytes_received: int
    bytes_lower: float
    allreduce_bytes: int
    intra_group_bytes: int
    sync_seconds: float
    compute_seconds: float


@dataclass
class Totals:
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_lower: float = 0.0
    sync_seconds: float = 0.0
    compute_seconds: float = 0.0
    rounds: int = 0
    history: list[RoundMetrics] = field(default_factory=list)


class SubnetTensors:
    """Where a rank's subnet values live, read and written whole (unpartitioned), by
    subnet name: by default the subnet module and its torch optimizer. A DeepSpeed engine
    that partitions them inside the group has its own (:class:`ist_accel.zero.ZeroSubnet`)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer

    def tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers (looked up each time: ``module.to()`` may replace buffers)."""
        return state_tensors(self.module)

    def optimizer_state(self) -> dict[str, dict[str, Any]]:
        """Per-parameter optimizer state by parameter name."""
        return _state_by_name(self.optimizer, self.module)

    def write(self, tensors: dict[str, torch.Tensor], state: dict[str, dict[str, Any]] | None = None) -> None:
        """Copy ``tensors`` in; a given ``state`` replaces the optimizer state."""
        local = state_tensors(self.module)
        with torch.no_grad():
            for name, value in tensors.items():
                local[name].copy_(value)
        if state is not None:
            params = dict(self.module.named_parameters())
            self.optimizer.state.clear()
            for name, entries in state.items():
                self.optimizer.state[params[name]] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                                      for k, v in entries.items()}

    def reset_optimizer_state(self) -> None:
        """A fresh optimizer state (policy ``reset``)."""
        self.optimizer.state.clear()

    def state_dict(self) -> dict[str, Any]:
        """The subnet and its optimizer state, for a checkpoint of this rank."""
        return {"subnet": {n: t.detach().clone() for n, t in self.tensors().items()},
                "optimizer": {n: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                              for n, st in self.optimizer_state().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "optimizer" not in state:
            raise ValueError("this IST checkpoint was written under DeepSpeed: resume it under the same DeepSpeed setup")
        self.write(state["subnet"], state["optimizer"])

    def resident_elements(self) -> int:
        """Elements of parameters, gradients, buffers and optimizer state held here."""
        n = sum(t.numel() for t in state_tensors(self.module).values())
        n += sum(p.grad.numel() for p in self.module.parameters() if p.grad is not None)
        return n + sum(v.numel() for st in self.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))


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

    STATE_FORMAT = "ist_accel.IST/1"

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerLike,
        config: ISTConfig,
        *,
        example_input: torch.Tensor | None = None,
        free_global: bool = True,
        reduce_gradients: bool = True,
    ) -> None:
        config.validate()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("IST needs torch.distributed initialized (torchrun / init_process_group)")
        self.config = config
        # config, world size and model checked together before any group of ours exists
        self.decomposition = check_setup(model, config, dist.get_world_size(), example_input)
        S, G = config.num_subnets, config.group_size
        self.rank = dist.get_rank()
        self.group_index, self.replica = divmod(self.rank, G)
        self.is_leader = self.replica == 0
        # every process group is created here, once: the ranks of each subnet group (fast
        # links) and, per replica index, that replica across the groups (slow links)
        timeout = datetime.timedelta(seconds=config.sync_timeout)
        groups = [dist.new_group(list(range(s * G, (s + 1) * G)), timeout=timeout) for s in range(S)] if G > 1 else []
        stripes = [dist.new_group([s * G + g for s in range(S)], timeout=timeout) for g in range(G)] if G > 1 else []
        self.intra = groups[self.group_index] if G > 1 else None
        self.model_global = model
        self.global_shapes = {n: (t.shape, t.dtype) for n, t in state_tensors(model).items()}
        self._broadcast_global(model)
        self.assignment = self.decomposition.assignment(0)
        self.subnet = self.decomposition.build_subnet(self.group_index)
        self.pieces = self.decomposition.pieces(self.assignment, self.group_index)
        load_subnet(self.subnet, state_tensors(model), self.pieces)
        self.device = next(self.subnet.parameters()).device
        self.exchange = Exchange(
            self.group_index, S, replica=self.replica, group_size=G, intra_pg=self.intra,
            stripe_pg=stripes[self.replica] if G > 1 else None, wire_dtype=config.wire_dtype, device=self.device,
        )
        self._init_owner_shards(model)
        self.optimizer = self._make_optimizer(optimizer)
        self.tensors = SubnetTensors(self.subnet, self.optimizer)
        self._hooks = [self.optimizer.register_step_post_hook(self._after_step)]
        if reduce_gradients and self.intra is not None:
            self._hooks.append(self.optimizer.register_step_pre_hook(self._before_step))
        self.on_sync: list[Callable[[RoundMetrics], None]] = []
        self.free_global = free_global
        self.steps = 0
        self.round = 0
        self.totals = Totals()
        blob = repr(sorted((n, tuple(sh), str(dt)) for n, (sh, dt) in self.global_shapes.items()))
        self._model_hash = int(hashlib.sha256(blob.encode()).hexdigest()[:12], 16)
        self._take_snapshot()
        self._round_started = time.perf_counter()
        if free_global:
            self.release_global()

    # ---- the user-facing pieces ----------------------------------------------

    def hand_over(self, tensors: SubnetTensors) -> None:
        """Let another owner hold the subnet's values (a DeepSpeed engine, which partitions
        them and steps its own optimizer): round ends read and write through ``tensors``,
        and the integration calls :meth:`step_done` after each optimizer step."""
        self.close()
        self.tensors = tensors
        self._take_snapshot()

    def step_done(self) -> None:
        """Count one optimizer step; every ``local_steps`` steps this ends the round."""
        self._after_step(None, (), {})

    @property
    def model(self) -> nn.Module:
        """The subnet this rank trains (fixed shape; refilled every round)."""
        return self.subnet

    def sync(self) -> RoundMetrics:
        """End the round now: average over holders and dispatch the next assignment.

        First, one small all-reduce checks that every rank is at the same round and step
        with the same config, assignment and model, and that no subnet went non-finite
        (policy ``nonfinite``). A failing collective raises :class:`ISTSyncError`."""
        try:
            return self._sync()
        except ISTError:
            raise
        except Exception as error:
            if not _is_communication_error(error):
                raise
            raise ISTSyncError(
                f"round {self.round} (step {self.steps}) failed on rank {self.rank}: {error}. A peer process "
                "probably died or stalled past the process-group timeout; restart from the last checkpoint"
            ) from error

    def _sync(self) -> RoundMetrics:
        compute = time.perf_counter() - self._round_started
        start = time.perf_counter()
        current = self._check_round()
        following = self.decomposition.assignment(self.round + 1)
        stats = CommStats()
        if self.intra is not None:
            self._average_buffers_in_group(stats)
        fields = self._fields(following, current[1])
        staged: dict[str, torch.Tensor] = {}
        self._read_cache = current
        stats.add(self.exchange.run(fields, self._read, staged.__setitem__, self.round))
        inject("sync", self.rank, self.steps)
        next_pieces = self.decomposition.pieces(following, self.group_index)
        self._read_cache = None
        self._apply(staged, next_pieces)
        if self.config.optimizer_state == "reset":
            self.tensors.reset_optimizer_state()
        seconds = time.perf_counter() - start  # the exchange itself, not the bookkeeping below
        lower = self._lower_bound(fields)
        self.assignment, self.pieces = following, next_pieces
        metrics = RoundMetrics(
            self.round, stats.sent + stats.allreduce_sent, stats.received + stats.allreduce_sent, lower,
            stats.allreduce_sent, stats.intra_group, seconds, compute,
        )
        self.round += 1
        t = self.totals
        t.bytes_sent += metrics.bytes_sent
        t.bytes_received += metrics.bytes_received
        t.bytes_lower += lower
        t.sync_seconds += metrics.sync_seconds
        t.compute_seconds += compute
        t.rounds += 1
        t.history.append(metrics)
        self._take_snapshot()
        for callback in self.on_sync:
            callback(metrics)
        self._round_started = time.perf_counter()
        return metrics

    # ---- rank agreement and numerical faults (checked at every sync) ------------

    def _agreement_fields(self) -> dict[str, int]:
        return {
            "round": self.round,
            "step": self.steps,
            "world size": dist.get_world_size(),
            "config": int(self.config.fingerprint()[:12], 16),
            "assignment": int(self.assignment.digest()[:12], 16),
            "model": self._model_hash,
        }

    def _check_round(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
        """One all-reduce of a few integers: max and min of every agreement field, and a
        per-group flag for non-finite subnets. Every rank sees the same result, so every
        rank raises (or skips) alike. Returns the subnet's values and optimizer state."""
        current = self._current()
        fields = self._agreement_fields()
        S = self.config.num_subnets
        mine = torch.tensor(list(fields.values()), dtype=torch.int64)
        bad = torch.zeros(S, dtype=torch.int64)
        bad[self.group_index] = int(not _finite(*current))
        payload = torch.cat([mine, -mine, bad]).to(self.device)
        dist.all_reduce(payload, op=dist.ReduceOp.MAX)
        payload = payload.cpu()
        k = len(fields)
        for (name, _), high, low in zip(fields.items(), payload[:k].tolist(), (-payload[k : 2 * k]).tolist()):
            if high != low:
                raise ISTAgreementError(
                    f"ranks disagree on the {name} at sync (rank {self.rank} has {fields[name]}, others range "
                    f"{low}..{high}): every rank must run the same config, seed, model and step count")
        groups = payload[2 * k :].nonzero().flatten().tolist()
        if not groups:
            return current
        where = f"round {self.round} (step {self.steps}): subnet group(s) {groups} hold NaN/Inf"
        if self.config.nonfinite == "raise":
            raise ISTNonFiniteError(f"{where}; nothing was averaged (nonfinite='raise'; 'skip' drops such updates)")
        logger.warning("%s; their updates of this round are dropped (nonfinite='skip')", where)
        if self.group_index in groups:
            self._restore_snapshot()
            return self._current()
        return current

    def _current(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
        """The subnet's values and (policy ``carry``) optimizer state, whole."""
        carry = self.config.optimizer_state == "carry"
        return self.tensors.tensors(), self.tensors.optimizer_state() if carry else {}

    def _take_snapshot(self) -> None:
        """Policy ``skip`` keeps the round's starting values (a subnet's worth of memory)."""
        if self.config.nonfinite != "skip":
            return
        self._snapshot = (
            {n: t.detach().clone() for n, t in self.tensors.tensors().items()},
            {n: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
             for n, st in self.tensors.optimizer_state().items()},
        )

    def _restore_snapshot(self) -> None:
        """Drop this group's update of the round: back to the values it started with."""
        tensors, state = self._snapshot
        self.tensors.write(tensors, state)

    def exclude_from_compute(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation inside the round, say) out of the round's compute time."""
        self._round_started += seconds

    @property
    def at_round_boundary(self) -> bool:
        """True when no optimizer step was taken since the last synchronization."""
        return self.steps % self.config.local_steps == 0

    def subnet_numel(self) -> int:
        """Parameters in this rank's subnet."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.subnet.parameters())  # ZeRO-3: unpartitioned

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
            **self.tensors.state_dict(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups],
            "owners": {n: v.clone() for n, v in self.exchange.owners.values.items()},
            "owner_rows": {n: list(r) for n, r in self.exchange.owners.rows.items()},
            "totals": dataclasses.asdict(self.totals),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` of this rank; the run must have the same config and world."""
        if not isinstance(state, dict) or state.get("format") != self.STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not an IST rank state (format {found!r}, expected {self.STATE_FORMAT!r})")
        mine = self.config.to_dict()
        for key, value in state["config"].items():
            if key not in ("extra",) and mine.get(key) != value:
                raise ValueError(f"checkpoint was written with {key}={value!r}, this run has {key}={mine.get(key)!r}")
        for key, value in (("world_size", dist.get_world_size()), ("rank", self.rank)):
            if state[key] != value:
                raise ValueError(f"checkpoint was written with {key}={state[key]}, this run has {key}={value}")
        owners = self.exchange.owners
        if set(state["subnet"]) != set(self.tensors.tensors()) or not set(owners.values) <= set(state["owners"]):
            raise ValueError("checkpoint's subnet tensors differ from this run's subnet (another model?)")
        self.round, self.steps = state["round"], state["steps"]
        self.assignment = self.decomposition.assignment(self.round)
        self.pieces = self.decomposition.pieces(self.assignment, self.group_index)
        self.tensors.load_state_dict(state)
        for group, saved in zip(self.optimizer.param_groups, state["param_groups"]):
            group.update(saved)  # learning rates as the scheduler left them
        for name, value in state["owners"].items():  # optimizer-state shards appear at the first sync
            owners.rows[name] = tuple(state["owner_rows"][name])
            owners.values[name] = value.to(owners.device)
        totals = dict(state["totals"])
        totals["history"] = [RoundMetrics(**m) for m in totals["history"]]
        self.totals = Totals(**totals)
        self._take_snapshot()
        self._round_started = time.perf_counter()

    def gather_global(self, dst: int | None = 0) -> nn.Module | None:
        """The global model as it stands after the last sync, on rank ``dst`` (``None``: all).

        Must be called on every rank at a round boundary (no step since the last sync).
        """
        names = list(self.global_shapes)
        state = {n: torch.zeros(self.global_shapes[n][0], dtype=torch.float64, device=self.device) for n in names}
        filled = {n: torch.zeros(self.global_shapes[n][0], dtype=torch.bool, device=self.device) for n in names}
        local = self.tensors.tensors()  # every rank: a partitioned subnet is assembled in the group
        if self.is_leader:
            for piece in self.pieces:
                _scatter(state[piece.global_name], piece, local[piece.subnet_name])
                _scatter(filled[piece.global_name], piece, torch.ones_like(local[piece.subnet_name], dtype=torch.bool))
            held_anywhere = self._held_anywhere()
            for name, value in self.exchange.owners.values.items():
                if name in state:
                    lo, hi = self.exchange.owners.rows[name]
                    unheld = ~held_anywhere[name][lo:hi].to(self.device)
                    state[name][lo:hi][unheld] = value[unheld].to(state[name].dtype)
                    filled[name][lo:hi] |= unheld
        # one element can be filled by several holders (same value after sync): average
        flat = torch.cat([state[n].reshape(-1).to(torch.float64) for n in names])
        count = torch.cat([filled[n].reshape(-1).to(torch.float64) for n in names])
        dist.all_reduce(flat)
        dist.all_reduce(count)
        flat = flat / count.clamp_min(1)
        if dst is not None and self.rank != dst:
            return None
        model = self.model_global
        offset = 0
        live = state_tensors(model)  # non-persistent buffers too (e.g. rotary inv_freq)
        with torch.no_grad():
            for n in names:
                shape, dtype = self.global_shapes[n]
                k = shape.numel()
                value = flat[offset : offset + k].view(shape).to(dtype)
                if live[n].numel() != k:
                    live[n].data = value.clone()
                else:
                    live[n].copy_(value)
                offset += k
        return model

    def _held_anywhere(self) -> dict[str, torch.Tensor]:
        """Per owner-shard tensor, which elements some group holds this round."""
        S = self.config.num_subnets
        pieces = [{p.global_name: p for p in self.decomposition.pieces(self.assignment, s)} for s in range(S)]
        return {
            name: torch.stack([_positions(pieces[s].get(name), self.global_shapes[name][0]) >= 0 for s in range(S)]).any(0)
            for name in self.exchange.owners.values
            if name in self.global_shapes
        }

    @contextlib.contextmanager
    def eval_global(self, dst: int | None = None) -> Iterator[nn.Module | None]:
        """The gathered global model in its evaluation view (all units, eval scaling);
        its storage is dropped again on exit when the engine was built with ``free_global``."""
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
        (sum of the metric, number of items); default: top-1 accuracy of ``(x, y)`` batches."""
        score = score or _accuracy_counts
        world = dist.get_world_size()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        shard = torch.utils.data.Subset(dataset, range(self.rank, len(dataset), world))
        loader = torch.utils.data.DataLoader(shard, batch_size=batch_size)
        with self.eval_global(dst=None) as model, torch.no_grad():
            for batch in loader:
                value, count = score(model, _to_device(batch, self.device))
                totals += torch.tensor([value, count], dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        return float(totals[0] / totals[1].clamp_min(1))

    def resident_elements(self) -> int:
        """Tensor elements this rank keeps: subnet parameters, gradients, optimizer state,
        buffers, owner shards and whatever remains of the global model."""
        n = self.tensors.resident_elements()
        n += self.exchange.owners.numel()
        n += sum(t.numel() for t in state_tensors(self.model_global).values())
        return n

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ---- hooks -----------------------------------------------------------------

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self.intra is None:
            return
        grads = [p.grad for p in self.subnet.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.intra)
        flat /= self.config.group_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        inject("step", self.rank, self.steps, self.tensors.tensors().values())
        if self.steps % self.config.local_steps == 0:
            self.sync()

    # ---- internals ---------------------------------------------------------------

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
            else:
                groups[index]["params"].append(param)
        accepted = inspect.signature(type(optimizer).__init__).parameters
        defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}  # AdamW keeps extra keys
        return type(optimizer)(groups, **defaults)

    def _broadcast_global(self, model: nn.Module) -> None:
        tensors = list(state_tensors(model).values())
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
        dist.broadcast(flat, 0)
        offset = 0
        with torch.no_grad():
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def _init_owner_shards(self, model: nn.Module) -> None:
        S = self.config.num_subnets
        per_tensor: dict[str, dict[int, Piece]] = {}
        for s in range(S):
            for p in self.decomposition.pieces(self.assignment, s):
                per_tensor.setdefault(p.global_name, {})[s] = p
        tensors = state_tensors(model)
        for name, pieces in per_tensor.items():
            if all(p.index is None for p in pieces.values()) and len(pieces) > 0:
                continue
            shape, dtype = self.global_shapes[name]
            unheld = torch.stack([_positions(pieces.get(s), shape) < 0 for s in range(S)]).all(0)
            if unheld.any():
                self.exchange.owners.ensure(name, shape, dtype, init=tensors[name].detach())

    def release_global(self) -> None:
        """Drop the global model's storage (it is gathered again on demand)."""
        with torch.no_grad():
            for t in state_tensors(self.model_global).values():
                t.data = torch.empty(0, dtype=t.dtype)

    def _fields(self, following: Assignment, state: dict[str, dict[str, Any]]) -> list[Field]:
        d, S = self.decomposition, self.config.num_subnets
        now = [d.pieces(self.assignment, s) for s in range(S)]
        nxt = [d.pieces(following, s) for s in range(S)]
        fields = {n: Field(n, shape, dtype) for n, (shape, dtype) in self.global_shapes.items()}
        for s in range(S):
            for p in now[s]:
                fields[p.global_name].now[s] = p
            for p in nxt[s]:
                fields[p.global_name].next[s] = p
        out = list(fields.values())
        if self.config.optimizer_state == "carry":
            out += self._state_fields(fields, state)
        return out

    def _state_fields(self, fields: dict[str, Field], state: dict[str, dict[str, Any]]) -> list[Field]:
        """Optimizer-state entries travel like their parameters (policy ``carry``).

        The field list must be the same on every rank, so it is derived from the global
        parameter list and the optimizer's state keys, not from what this rank holds.
        """
        keys: dict[str, torch.Tensor] = {}
        for entries in state.values():
            keys.update({k: v for k, v in entries.items() if k not in keys and isinstance(v, torch.Tensor)})
        params = [n for n, _ in self.model_global.named_parameters()]
        out = []
        for gname in params:
            f = fields[gname]
            for key in sorted(keys):
                scalar = keys[key].dim() == 0

                def relabel(pieces: dict[int, Piece], key: str = key, scalar: bool = scalar) -> dict[int, Piece]:
                    return {s: Piece(f"{p.subnet_name}:{key}", f"{gname}:{key}", None if scalar else p.index)
                            for s, p in pieces.items()}

                shape = torch.Size([]) if scalar else f.shape
                out.append(Field(f"{gname}:{key}", shape, keys[key].dtype, relabel(f.now), relabel(f.next)))
        return out

    def _read(self, field_name: str) -> torch.Tensor | None:
        gname, _, key = field_name.partition(":")
        piece = self._held.get(gname)
        if piece is None:
            return None
        tensors, state = self._read_cache
        if not key:
            return tensors[piece.subnet_name].detach()
        return state[piece.subnet_name][key]

    @property
    def pieces(self) -> list[Piece]:
        """Where this rank's subnet tensors come from in the current round."""
        return self._pieces

    @pieces.setter
    def pieces(self, pieces: list[Piece]) -> None:
        self._pieces = pieces
        self._held = {p.global_name: p for p in pieces}

    def _apply(self, staged: dict[str, torch.Tensor], next_pieces: list[Piece]) -> None:
        by_global = {p.global_name: p for p in next_pieces}
        tensors: dict[str, torch.Tensor] = {}
        state: dict[str, dict[str, torch.Tensor]] = {}
        for field_name, value in staged.items():
            gname, _, key = field_name.partition(":")
            name = by_global[gname].subnet_name
            if not key:
                tensors[name] = value
            else:
                state.setdefault(name, {})[key] = value
        carry = self.config.optimizer_state == "carry" and bool(staged)
        self.tensors.write(tensors, state if carry else None)

    def _average_buffers_in_group(self, stats: CommStats) -> None:
        buffers = [b for b in self.subnet.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.all_reduce(flat, group=self.intra)
        stats.intra_group += flat.numel() * flat.element_size()
        flat /= self.config.group_size
        offset = 0
        for b in buffers:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()

    def _lower_bound(self, fields: list[Field]) -> float:
        """This rank's share of the round's lower bound (accounting.py's definition),
        over the fields actually exchanged, in wire bytes."""
        S, me = self.config.num_subnets, self.group_index
        esize = torch.tensor([], dtype=self.exchange.wire).element_size()
        total = sum(float(tensor_bound(f.shape, f.now, f.next, S)[0][me]) for f in fields)
        return total * esize / self.config.group_size


def _finite(tensors: dict[str, torch.Tensor], state: dict[str, dict[str, Any]]) -> bool:
    values = [*tensors.values(), *(v for st in state.values() for v in st.values() if isinstance(v, torch.Tensor))]
    return all(bool(torch.isfinite(t).all()) for t in values if t.is_floating_point())


def _state_by_name(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, dict[str, Any]]:
    names = {p: n for n, p in module.named_parameters()}
    return {names[p]: st for p, st in optimizer.state.items() if p in names}


def _is_communication_error(error: Exception) -> bool:
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe", "peer"))


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


def _accuracy_counts(model: nn.Module, batch: Any) -> tuple[float, int]:
    x, y = batch
    return float((model(x).argmax(-1) == y).sum()), len(y)


def _scatter(target: torch.Tensor, piece: Piece, value: torch.Tensor) -> None:
    if piece.index is None:
        target.copy_(value.to(target.dtype))
    else:
        target.index_put_(piece._grid(target), value.to(target.dtype))


__all__ = ["IST", "RoundMetrics", "SubnetTensors", "Totals"]
