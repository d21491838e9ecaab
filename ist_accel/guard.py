"""Rank agreement and numerical faults, checked before anything of the global model moves
or is read (docs/reliability.md).

Every rank sends a few integers (the agreement fields and its non-finite flag) to every
other rank (one message latency; a small all-reduce would chain 2 (N-1) of them), so each
sees the minimum and maximum of each field and every group's flag and every rank reaches
the same verdict: all raise :class:`ISTAgreementError` naming the field,
all raise :class:`ISTNonFiniteError`, or all skip the same groups' updates. The payload
has the same size at every check, so ranks that reach different checks (one syncing,
one evaluating) meet in the same collective and are told so (field ``phase``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .faults import ISTAgreementError, ISTNonFiniteError
from .transport import Transport

logger = logging.getLogger(__name__)

PHASES = {"set-up": 1, "sync": 2, "read": 3}
COUNTS = ("round", "step", "world size")  # fields reported by value (the others are digests)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating-point tensor is finite: one fused pass (a NaN or Inf anywhere
    makes its sum non-finite; a finite sum above ~3e38 counts as an overflow, too)."""
    sums = [t.detach().sum(dtype=torch.float32) for t in tensors if t.is_floating_point() and t.numel()]
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())


class RoundGuard:
    """The agreement check and the non-finite verdict (module docstring)."""

    def __init__(self, transport: Transport, num_groups: int, group_index: int, rank: int, nonfinite: str,
                 device: torch.device) -> None:
        self.transport, self.S, self.group_index, self.rank = transport, num_groups, group_index, rank
        self.nonfinite, self.device = nonfinite, device

    def check(self, fields: dict[str, int], finite: bool = True) -> list[int]:
        """Raise unless every rank passed the same ``fields``; return the groups whose flag
        says non-finite."""
        return self.start(fields, finite)()

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


def clone_state(state: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()} for n, st in state.items()}


__all__ = ["PHASES", "RoundGuard", "all_finite", "clone_state"]
