"""The summary of ``compare.py --network`` runs: time to a target accuracy, measured (the crossing
interpolated between evaluations) and modeled (a basis run's time plus its exchange bytes at a
link's nominal rate, or at the rate ``linkprobe.py`` measured for the method's pattern), accuracy
at the budget, and the kernel's byte counts against the run's own (issue 36)."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netbed import rate_bits  # noqa: E402


def reported_bytes(run: dict[str, Any]) -> float:
    """All bytes a worker sent by the run's own account: the wiretap's total, plus the modeled
    exchange where the wiretap cannot see it (torchft's DiLoCo: its own process group)."""
    total = run.get("total_bytes_sent_per_worker", run["bytes_sent_per_worker"])
    return total if run["bytes_measured"] else total + run["bytes_sent_per_worker"]


def exchange_bytes(run: dict[str, Any], point: dict[str, float]) -> float:
    """Exchange bytes a worker sent up to ``point``: the wiretap's count, or where it cannot see
    them (torchft), the run's modeled total pro rata to the steps."""
    if run["bytes_measured"]:
        return point["bytes_sent_per_worker"]
    return run["bytes_sent_per_worker"] * point["step"] / max(run["steps"], 1)


def reached(run: dict[str, Any], target: float) -> dict[str, float] | None:
    return next((p for p in run["history"] if p["accuracy"] >= target), None)


def crossing_point(run: dict[str, Any], target: float) -> tuple[float, float] | None:
    """(wall seconds, exchange bytes) when the accuracy crossed ``target``: linear between the
    last evaluation below it and the first at or above it (the first itself when none was
    below); None if never reached."""
    history = run["history"]
    for i, p in enumerate(history):
        if p["accuracy"] >= target:
            q = history[i - 1] if i else p
            f = (target - q["accuracy"]) / (p["accuracy"] - q["accuracy"]) if q["accuracy"] < target else 1.0
            return (q["wall_seconds"] + f * (p["wall_seconds"] - q["wall_seconds"]),
                    exchange_bytes(run, q) + f * (exchange_bytes(run, p) - exchange_bytes(run, q)))
    return None


def crossing(run: dict[str, Any], target: float) -> float | None:
    """When the accuracy crossed ``target`` (:func:`crossing_point`)."""
    point = crossing_point(run, target)
    return point[0] if point else None


def model_basis(runs: dict[str, dict[str, list[dict]]]) -> str:
    """The rate the modeled times start from: the unshaped run (``none``) where there is one, else
    the fastest link (its own bytes at its rate are taken off before those at another are added)."""
    return "none" if "none" in runs else max(runs, key=rate_bits)


def pattern(method: str) -> str:
    """The communication pattern a method's syncs use (benchmarks/linkprobe.py's names)."""
    return "all-to-all, the engine's" if method.startswith("ist") else "ring all-reduce"


def effective_bits(rate: str, method: str, probes: dict[str, dict] | None) -> float:
    """What the link delivers to ``method``'s pattern: probed where a probe of ``rate`` exists
    (bits per second), else the nominal rate; 0 for ``none`` (not shaped)."""
    record = (probes or {}).get(rate)
    if not rate_bits(rate):
        return 0.0
    return record["patterns"][pattern(method)]["effective_bits_per_second"] if record else rate_bits(rate)


def summarize(runs: dict[str, dict[str, list[dict]]], target: float, budget: float,
              probes: dict[str, dict] | None = None) -> dict[str, Any]:
    """Per rate and method: measured time to target, accuracy at budget, kernel and reported bytes,
    and the modeled time to target: at the nominal rate, and at what ``probes`` (rate ->
    linkprobe record) measured the link to deliver to the method's pattern."""
    basis = model_basis(runs)
    basis_bits = rate_bits(basis)
    out: dict[str, Any] = {}
    for rate, by_method in runs.items():
        bits = rate_bits(rate)
        out[rate] = {}
        for method, rs in by_method.items():
            times = [p["wall_seconds"] if (p := reached(r, target)) else None for r in rs]
            # the last evaluation below the target: the crossing lies between it and the first above
            before = [max((p["wall_seconds"] for p in r["history"] if p["accuracy"] < target
                           and (t is None or p["wall_seconds"] < t)), default=0.0) for r, t in zip(rs, times)]
            at_budget = [max((p for p in r["history"] if p["wall_seconds"] <= budget),
                             key=lambda p: p["wall_seconds"], default={"accuracy": None})["accuracy"] for r in rs]
            kernel = [r["network"]["kernel_tx_bytes_per_node"] for r in rs]
            reported = [reported_bytes(r) for r in rs]
            row = {
                "wall_seconds_to_target": times, "wall_seconds_last_below_target": before,
                "wall_seconds_to_target_interpolated": [crossing(r, target) for r in rs],
                "accuracy_at_budget": at_budget,
                "final_accuracy": [r["final_accuracy"] for r in rs],
                "steps": [r["steps"] for r in rs],
                "kernel_tx_bytes_per_node": kernel, "reported_bytes_per_worker": reported,
                "reported_exchange_bytes_per_worker": [r["bytes_sent_per_worker"] for r in rs],
                # what the kernel counted beyond what the run reports (all nodes, over the reported total)
                "kernel_over_reported": [sum(k) / (len(k) * b) - 1 if b else None for k, b in zip(kernel, reported)],
                "startup_seconds": [r["network"]["elapsed_seconds"] - r["train_seconds"]
                                    - r["history"][-1]["eval_seconds"] for r in rs],
                "seconds_per_step": [r["history"][-1]["wall_seconds"] / max(r["history"][-1]["step"], 1) for r in rs],
            }
            rounds = [max(r.get("rounds") or 0, 1) for r in rs]
            row["sync_seconds_per_round"] = [r["sync_seconds"] / n if r.get("sync_seconds") else None
                                             for r, n in zip(rs, rounds)]
            if bits:  # the exchange's bytes per round at the link's rate: the least a round's sync can take
                row["rate_seconds_per_round"] = [r["bytes_sent_per_worker"] * 8 / bits / n for r, n in zip(rs, rounds)]
            if bits and rate != basis and method in runs[basis]:
                row["modeled_from"] = basis
                row["modeled_seconds_to_target"] = modeled(runs[basis][method], target, bits, basis_bits)
                if probes and rate in probes and (basis in probes or not basis_bits):
                    row["modeled_seconds_to_target_probed"] = modeled(
                        runs[basis][method], target, effective_bits(rate, method, probes),
                        effective_bits(basis, method, probes))
            out[rate][method] = row
    return out


def modeled(basis_runs: list[dict], target: float, bits: float, basis_bits: float) -> list[float | None]:
    """Each basis run's wall-clock to ``target`` (interpolated, as the measured time), its
    exchange bytes by then moved at ``bits`` per second instead of ``basis_bits`` (0: not shaped)."""
    return [c[0] + c[1] * 8 * (1 / bits - (1 / basis_bits if basis_bits else 0))
            if (c := crossing_point(r, target)) else None for r in basis_runs]


def mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def table(summary: dict[str, Any], target: float, budget: float) -> str:
    fmt = lambda v, f="{:.1f}": "—" if v is None else f.format(v)  # noqa: E731
    lines = []
    for rate, by_method in summary.items():
        lines += [f"\n### {rate} per link\n",
                  f"| method | s to {target:g} (measured, interpolated; the evaluations either side) | s to {target:g} (modeled: at the rate; "
                  f"at the probed rate) | accuracy at {budget:g} s | "
                  "steps | s / step | sync s / round (its bytes at the rate) | kernel tx MB / node | reported MB / worker | "
                  "kernel over reported | start-up s |",
                  "|" + "---|" * 11]
        for method, r in by_method.items():
            unreached = sum(t is None for t in r["wall_seconds_to_target"])
            note = f" ({unreached} of {len(r['wall_seconds_to_target'])} not within budget)" if unreached else ""
            lines.append(
                f"| {method} | {fmt(mean(r['wall_seconds_to_target_interpolated']))} "
                f"({fmt(mean(r['wall_seconds_last_below_target']))}-{fmt(mean(r['wall_seconds_to_target']))}){note} | "
                f"{fmt(mean(r.get('modeled_seconds_to_target', [None])))}; "
                f"{fmt(mean(r.get('modeled_seconds_to_target_probed', [None])))} | {fmt(mean(r['accuracy_at_budget']), '{:.4f}')} | "
                f"{fmt(mean(r['steps']), '{:.0f}')} | {fmt(mean(r['seconds_per_step']), '{:.3f}')} | "
                f"{fmt(mean(r['sync_seconds_per_round']), '{:.3f}')} ({fmt(mean(r.get('rate_seconds_per_round', [None])), '{:.3f}')}) | "
                f"{fmt(mean([statistics.mean(k) for k in r['kernel_tx_bytes_per_node']]) / 1e6, '{:.2f}')} | "
                f"{fmt(mean(r['reported_bytes_per_worker']) / 1e6, '{:.2f}')} | "
                f"{fmt(mean(r['kernel_over_reported']), '{:+.1%}')} | {fmt(mean(r['startup_seconds']))} |")
    return "\n".join(lines)
