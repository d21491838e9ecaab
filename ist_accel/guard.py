"""Rank agreement and numerical faults, checked before anything of the global model moves
or is read (docs/reliability.md).

Every rank sends a few integers (the agreement fields and its non-finite flag) to every
other rank (one message latency; a small all-reduce would chain 2 (N-1) of them), so each
sees the minimum and maximum of each field and every group's flag and every rank reaches
the same verdict: all raise :class:`ISTAgreementError` naming the field,
all raise :class:`ISTNonFiniteError`, or all skip the same groups' updates. The payload
has the same size at every check, so ranks that reach different checks (one syncing,
one evaluating) meet in the same collective and are told so (field ``phase``).

Policy ``skip`` needs the round's starting values to fall back to: :class:`SkipSnapshot`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .faults import ISTAgreementError, ISTNonFiniteError
from .subnet import SubnetTensors, clone_state
from .transport import Transport

logger = logging.getLogger(__name__)

PHASES = {"set-up": 1, "sync": 2, "read": 3}
COUNTS = ("round", "step", "world size")  # fields reported by value (the others are digests)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating-point tensor is finite: one fused pass (a NaN or Inf anywhere
    makes its sum non-finite; a finite sum above ~3e38 counts as an overflow, too)."""
    sums = [t.detach().sum(dtype=torch.float32) for t in tensors if t.is_floating_point() and t.numel()]
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())


def digest(value: Any) -> int:
    """A 48-bit digest of ``value``'s ``repr`` (an agreement field)."""
    return int(hashlib.sha256(repr(value).encode()).hexdigest()[:12], 16)


class RoundGuard:
    """The agreement check and the non-finite verdict (module docstring)."""

    def __init__(self, transport: Transport, num_groups: int, group_index: int, rank: int, nonfinite: str,
                 device: torch.device, identity: Callable[[], dict[str, int]] = dict) -> None:
        self.transport, self.S, self.group_index, self.rank = transport, num_groups, group_index, rank
        self.nonfinite, self.device = nonfinite, device
        self.identity = identity  # what must not change in a run, read at each check: world size, model, config

    def post(self, phase: str, round_: int, step: int, assignment: int, fields: list | None = None,
             finite: bool = True) -> Callable[[], bool]:
        """Post the check of ``phase`` at ``round_``/``step`` (``assignment``: its digest;
        ``fields``: the round's field specs at a sync) with this rank's non-finite flag;
        the result, called, waits for the verdict (:meth:`verdict`): True if this group
        must drop its update of the round."""
        agreement = {"phase": PHASES[phase], **self.identity(), "round": round_, "step": step, "assignment": assignment,
                     "fields": digest([(f.name, tuple(f.shape)) for f in fields]) if fields is not None else 0}
        pending = self.start(agreement, finite)
        return lambda: self.verdict(pending(), f"round {round_} (step {step})")

    def start(self, fields: dict[str, int], finite: bool = True) -> Callable[[], list[int]]:
        """Post the check and return its result to call later (local work can go on while
        the flags travel)."""
        mine = torch.tensor([*fields.values(), self.group_index, int(not finite)], dtype=torch.int64)
        out, works = self.transport.start_small(mine.to(self.device), "check")

        def result() -> list[int]:
            for work in works:
                work.wait()
            return self._verify(fields, out.cpu())

        return result

    def _verify(self, fields: dict[str, int], every: torch.Tensor) -> list[int]:
        k = len(fields)
        names = {v: k_ for k_, v in PHASES.items()}
        highs, lows = every[:, :k].max(0).values.tolist(), every[:, :k].min(0).values.tolist()
        for (name, value), high, low in zip(fields.items(), highs, lows):
            if high != low:
                if name == "phase":
                    raise ISTAgreementError(
                        f"ranks are at different points (rank {self.rank} is in {names.get(value, value)}, others "
                        f"range {names.get(low, low)}..{names.get(high, high)}): every rank must sync, evaluate and "
                        "save at the same steps")
                values = f"rank {self.rank} has {value}, others range {low}..{high}" if name in COUNTS else \
                    f"rank {self.rank}'s differs from another rank's"
                raise ISTAgreementError(
                    f"ranks disagree on the {name} ({values}): every rank must run the same model, config, seed and "
                    "step count")
        return sorted({int(g) for g, flag in every[:, k:].tolist() if flag})

    def verdict(self, groups: list[int], where: str) -> bool:
        """Apply the non-finite policy to the flagged ``groups``; True if this rank's group
        must drop its update (policy ``skip``)."""
        if not groups:
            return False
        message = f"{where}: subnet group(s) {groups} hold NaN/Inf"
        if self.nonfinite == "raise":
            raise ISTNonFiniteError(f"{message}; nothing was averaged (nonfinite='raise'; 'skip' drops such updates)")
        logger.warning("%s; their updates of this round are dropped (nonfinite='skip')", message)
        return self.group_index in groups


class SkipSnapshot:
    """Policy ``skip``: a group's values, optimizer state and outer momentum at the round's
    start (a subnet's worth of memory), to fall back to when its update is dropped."""

    def __init__(self, tensors: SubnetTensors, momentum: dict[str, torch.Tensor]) -> None:
        self.tensors = {n: t.detach().clone() for n, t in tensors.tensors().items()}
        self.state = clone_state(tensors.optimizer_state())
        self.momentum = {n: m.clone() for n, m in momentum.items()}

    def restore(self, tensors: SubnetTensors, momentum: dict[str, torch.Tensor]) -> None:
        """Drop the round's update: back to the values it started with."""
        tensors.write(self.tensors, clone_state(self.state))
        for name, value in self.momentum.items():
            momentum[name].copy_(value)

    def nbytes(self) -> int:
        """Bytes it keeps (for ``IST.resident_bytes``)."""
        n = sum(t.numel() * t.element_size() for t in (*self.tensors.values(), *self.momentum.values()))
        return n + sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values()
                       if isinstance(v, torch.Tensor))


__all__ = ["PHASES", "RoundGuard", "SkipSnapshot", "all_finite", "digest"]
