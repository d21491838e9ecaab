"""Counting every byte a process moves through ``torch.distributed``, whoever calls it.

:class:`Wiretap` wraps the Python-level collectives and point-to-point calls of
``torch.distributed`` (and DDP's buffer broadcast) and adds up their payloads under the
current *phase* (``setup``, ``train``, ``eval``, ``save``; set with :meth:`Wiretap.phase`).
It is independent of the IST engine's own ledger, so it counts the baselines (DDP,
Accelerate's ``LocalSGD``) as it counts IST, and tests use it to check the engine's
figures. DDP's gradient all-reduce runs inside its C++ reducer; :meth:`Wiretap.ddp_hook`
is a comm hook that counts each bucket and then all-reduces it as DDP's default does.

Bytes per call, for this rank, over the call's group of ``N`` ranks (the algorithms gloo
and NCCL run): point-to-point: the payload; all-reduce ``2 (N-1)/N`` of it each way (ring);
all-gather ``N-1`` chunks each way; reduce-scatter ``(N-1)/N`` of the input; broadcast: the
root sends the payload to each of the others, which receive it once; reduce: the reverse.
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

# isend / irecv stay unwrapped: P2POp accepts only the originals (their batches are counted)
WRAPPED = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
           "batch_isend_irecv", "send", "recv", "_broadcast_coalesced", "all_to_all_single")


def _nbytes(t: Any) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _size(group: Any) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


class Wiretap:
    """Bytes sent and received by phase (module docstring). Install once per process."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = defaultdict(float)
        self.received: dict[str, float] = defaultdict(float)
        self.current = "setup"
        self.gradients = 0.0  # of which DDP's gradient buckets (ddp_hook)
        self._originals: dict[str, Any] = {}

    # ---- phases ---------------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count what happens inside under ``name``."""
        previous, self.current = self.current, name
        try:
            yield
        finally:
            self.current = previous

    def state_dict(self) -> dict[str, Any]:
        """The counts so far (a resumed run goes on counting from them)."""
        return {"sent": dict(self.sent), "received": dict(self.received), "gradients": self.gradients}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sent, self.received = defaultdict(float, state["sent"]), defaultdict(float, state["received"])
        self.gradients = state.get("gradients", 0.0)

    def total(self) -> tuple[float, float]:
        return sum(self.sent.values()), sum(self.received.values())

    def report(self) -> dict[str, dict[str, float]]:
        phases = sorted(set(self.sent) | set(self.received))
        return {p: {"sent": self.sent.get(p, 0.0), "received": self.received.get(p, 0.0)} for p in phases}

    def _add(self, sent: float, received: float) -> None:
        self.sent[self.current] += sent
        self.received[self.current] += received

    # ---- installing -----------------------------------------------------------------

    def install(self) -> Wiretap:
        """Wrap ``torch.distributed``'s functions (module attributes: every caller that looks
        them up at call time, which torch, Accelerate and DeepSpeed do, is counted)."""
        for name in WRAPPED:
            original = getattr(dist, name, None)
            if original is None or name in self._originals:
                continue
            self._originals[name] = original
            setattr(dist, name, self._wrap(name, original))
        return self

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals = {}

    def _wrap(self, name: str, original: Any) -> Any:
        count = getattr(self, f"_count_{name.lstrip('_')}")

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            count(*args, **kwargs)
            return original(*args, **kwargs)

        return counted

    # ---- the byte models --------------------------------------------------------------

    def _count_all_reduce(self, tensor, op=None, group=None, async_op=False):
        n = _size(group)
        ring = 2 * (n - 1) / n * _nbytes(tensor) if n > 1 else 0.0
        self._add(ring, ring)

    def _count_broadcast(self, tensor, src=None, group=None, async_op=False, group_src=None):
        self._count_rooted(_nbytes(tensor), src if group_src is None else dist.get_global_rank(group, group_src), group,
                           root_sends=True)

    def _count_reduce(self, tensor, dst=None, op=None, group=None, async_op=False, group_dst=None):
        self._count_rooted(_nbytes(tensor), dst if group_dst is None else dist.get_global_rank(group, group_dst), group,
                           root_sends=False)

    def _count_rooted(self, payload: int, root: int, group: Any, root_sends: bool) -> None:
        n = _size(group)
        if n < 2:
            return
        at_root = dist.get_rank() == root
        fan = payload * (n - 1)
        if root_sends:
            self._add(fan if at_root else 0.0, 0.0 if at_root else payload)
        else:
            self._add(0.0 if at_root else payload, fan if at_root else 0.0)

    def _count_all_gather(self, tensor_list, tensor, group=None, async_op=False):
        n = _size(group)
        self._add((n - 1) * _nbytes(tensor), (n - 1) * _nbytes(tensor))

    def _count_all_gather_into_tensor(self, output_tensor, input_tensor, group=None, async_op=False):
        self._count_all_gather(None, input_tensor, group)

    def _count_reduce_scatter_tensor(self, output, input, op=None, group=None, async_op=False):
        n = _size(group)
        share = (n - 1) / n * _nbytes(input) if n > 1 else 0.0
        self._add(share, share)

    def _count_all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                                 async_op=False):
        n = _size(group)
        share = (n - 1) / n if n > 1 else 0.0
        self._add(share * _nbytes(input), share * _nbytes(output))

    def _count_batch_isend_irecv(self, p2p_op_list):
        for op in p2p_op_list:
            if getattr(op.op, "__name__", "") in ("isend", "send"):
                self._add(_nbytes(op.tensor), 0.0)
            else:
                self._add(0.0, _nbytes(op.tensor))

    def _count_send(self, tensor, dst=None, group=None, tag=0, group_dst=None):
        self._add(_nbytes(tensor), 0.0)

    def _count_recv(self, tensor, src=None, group=None, tag=0, group_src=None):
        self._add(0.0, _nbytes(tensor))

    def _count_broadcast_coalesced(self, process_group, tensors, buffer_size, src=0):
        """DDP's broadcast of module states (parameters at set-up, buffers before a forward)."""
        self._count_rooted(_nbytes(list(tensors)), dist.get_global_rank(process_group, src)
                           if process_group is not None else src, process_group, root_sends=True)

    # ---- DDP's gradients --------------------------------------------------------------

    def ddp_hook(self, phase: str = "exchange") -> Any:
        """A DDP comm hook: DDP's default (average each gradient bucket with an all-reduce,
        which the wrapped ``all_reduce`` counts) under ``phase``, the buckets' share also kept
        in :attr:`gradients` (bytes sent)."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):  # no annotations: DDP checks them against dist.GradBucket
            n = _size(state)
            self.gradients += 2 * (n - 1) / n * _nbytes(bucket.buffer()) if n > 1 else 0.0
            with self.phase(phase):
                return allreduce_hook(state, bucket)

        return hook


__all__ = ["Wiretap"]
