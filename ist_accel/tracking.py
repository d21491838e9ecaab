"""What a round reports to experiment trackers (W&B through Accelerate, or any other):
the bytes it moved beside the lower bound, its compute and sync time, and a picture of
which units each subnet trained. :class:`RoundLogQueue` holds them until the loop's own
next ``log()``, so they go out at the loop's step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .decompositions import Assignment
from .metrics import RoundMetrics, Totals


def round_log(metrics: RoundMetrics, totals: Totals, subnet_params: int) -> dict[str, float]:
    """Scalars for one round (this rank's measurements), under ``ist/``: the round's exchange
    beside its lower bound, every other byte (agreement checks, gathers, set-up) and the
    run's totals, and the round's seconds by phase."""
    ledger_sent = sum(sent for sent, _ in totals.ledger.values())
    return {
        "ist/round": metrics.round,
        "ist/bytes_sent": metrics.bytes_sent,
        "ist/bytes_received": metrics.bytes_received,
        "ist/bytes_lower": metrics.bytes_lower,
        "ist/other_bytes_sent": metrics.other_bytes_sent,
        "ist/bytes_sent_total": totals.bytes_sent,
        "ist/bytes_received_total": totals.bytes_received,
        "ist/bytes_lower_total": totals.bytes_lower,
        "ist/all_bytes_sent_total": ledger_sent,
        "ist/subnet_params": subnet_params,
        "ist/compute_seconds": metrics.compute_seconds,
        "ist/sync_seconds": metrics.sync_seconds,
        "ist/plan_seconds": metrics.plan_seconds,
        "ist/wire_seconds": metrics.wire_seconds,
    }


def assignment_image(assignment: Assignment, scale: int = 4) -> np.ndarray:
    """An RGB picture of one round's assignment: one band per partitioned group (stage or
    layer), one row per subnet inside a band, one column per unit; a held unit is lit in
    its subnet's colour. Bands are separated by a grey row."""
    S = assignment.num_subnets
    groups = sorted({g for units in assignment.units for g in units})
    width = max((max(u[g]) + 1 for u in assignment.units for g in u if u[g]), default=1)
    rows = []
    palette = _palette(S)
    for g in groups:
        band = np.zeros((S, width, 3), dtype=np.uint8)
        for s, units in enumerate(assignment.units):
            band[s, list(units.get(g, ()))] = palette[s]
        rows += [band, np.full((1, width, 3), 96, dtype=np.uint8)]
    image = np.concatenate(rows[:-1]) if rows else np.zeros((1, 1, 3), dtype=np.uint8)
    return image.repeat(scale, 0).repeat(max(1, scale * 64 // max(width, 1)) if width < 64 else 1, 1)


class RoundLogQueue:
    """IST's round metrics (``ist/*`` and the assignment picture, every ``image_every``
    rounds; 0: never) held until the loop's next ``log()``: they go out at the loop's own
    step, whatever it counts (optimizer steps, epochs, a counter that restarts after a
    resume), so a tracker that refuses steps going backwards (W&B) never drops the user's
    metrics because of IST's."""

    def __init__(self, image_every: int = 1) -> None:
        self.image_every = image_every
        self.pending: list[tuple[dict[str, float], Any]] = []
        self.user_logged, self.user_step = False, None  # the loop's last log() step

    def add(self, metrics: RoundMetrics, totals: Totals, subnet_params: int, step: int,
            assignment: Callable[[int], Assignment]) -> None:
        """Queue one round's metrics (``step``: IST's optimizer step, logged as ``ist/step``;
        ``assignment(round)``: that round's assignment, drawn only for a picture)."""
        values = {**round_log(metrics, totals, subnet_params), "ist/step": step}
        image = None
        if self.image_every and metrics.round % self.image_every == 0:
            image = assignment_image(assignment(metrics.round))
        self.pending.append((values, image))

    def user_log(self, step: int | None) -> None:
        """The loop logged at ``step``."""
        self.user_logged, self.user_step = True, step if step is not None else self.user_step

    def flush(self, trackers: list[Any], step: int | None, is_main_process: bool) -> None:
        """Send what is queued to ``trackers`` at ``step`` (only the main process sends)."""
        pending, self.pending = self.pending, []
        if not is_main_process:
            return
        for values, image in pending:
            for tracker in trackers:
                tracker.log(values, step=step)
                if image is not None and hasattr(tracker, "log_images") and tracker.name != "tensorboard":
                    tracker.log_images({"ist/assignment": [image]}, step=step)


def _palette(n: int) -> np.ndarray:
    hues = np.linspace(0, 1, n, endpoint=False)
    rgb = np.stack([np.abs(hues * 6 - 3) - 1, 2 - np.abs(hues * 6 - 2), 2 - np.abs(hues * 6 - 4)], 1)
    return (np.clip(rgb, 0, 1) * 215 + 40).astype(np.uint8)


__all__ = ["RoundLogQueue", "assignment_image", "round_log"]
