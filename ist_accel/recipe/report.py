"""What a recipe run reports (``results.json``): the accuracy curve's points, the bytes
each method moved (measured by the wiretap; IST's also as the engine counts them beside
its lower bound), and what a worker kept in memory. Figures are reduced over ranks in one
collective each and read back by name."""

from __future__ import annotations

import argparse
import resource
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..accounting import ring_allreduce_bytes
from ..memory import peak_rss_bytes
from ..wiretap import Wiretap

PHASES = ("setup", "train", "exchange", "eval", "save")


def mean_over_ranks(accelerator: Accelerator, figures: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each named figure (one all-reduce, in float64)."""
    values = torch.tensor(list(figures.values()), dtype=torch.float64, device=accelerator.device)
    return dict(zip(figures, accelerator.reduce(values, "mean").tolist()))


def accuracy_point(args: argparse.Namespace, accelerator: Accelerator, step: int, batches_seen: int, accuracy: float,
                   wall: float, eval_seconds: float, tap: Wiretap) -> dict[str, float]:
    """One point of the accuracy curve (means over ranks): samples, exchange bytes sent per
    worker so far (the wiretap's count), ``wall_seconds``, the training loop's wall-clock so far
    with every method's syncs and without evaluation (the same clock for every method),
    ``eval_seconds`` the evaluations' so far, and ``compute_seconds`` (IST: the engine's
    measured compute without its syncs; a baseline: its wall time, syncs included)."""
    ist = accelerator.ist if args.method == "ist" else None
    compute = ist.totals.compute_seconds if ist is not None else wall
    mean = mean_over_ranks(accelerator, {"bytes_sent_per_worker": tap.sent.get("exchange", 0.0),
                                         "compute_seconds": compute, "wall_seconds": wall,
                                         "eval_seconds": eval_seconds})
    return {"step": step, "samples_per_worker": batches_seen * args.batch_size, "accuracy": accuracy, **mean}


def communication_report(args: argparse.Namespace, accelerator: Accelerator, model_params: int, steps: int,
                         tap: Wiretap) -> dict[str, Any]:
    """Bytes per worker for the whole run (mean over ranks), all measured by the wiretap:
    ``bytes_*_per_worker`` the method's model synchronization (IST's round ends; DDP's
    gradients; LocalSGD's syncs, with the one more at the end), ``total_bytes_*`` every
    byte (also set-up broadcasts, DDP's buffer broadcasts, agreement checks, evaluation and
    saving gathers), ``bytes_by_phase`` where they went. ``bytes_lower_per_worker``: IST's
    lower bound; for the baselines the ring all-reduce of the parameters per sync."""
    world = accelerator.num_processes
    sent_total, received_total = tap.total()
    figures = {"exchange_sent": tap.sent.get("exchange", 0.0), "exchange_received": tap.received.get("exchange", 0.0),
               "total_sent": sent_total, "total_received": received_total,
               **{f"{phase}_sent": tap.sent.get(phase, 0.0) for phase in PHASES}}
    if args.method == "ist":
        ist = accelerator.ist
        t = ist.totals
        figures.update({"engine_sent": t.bytes_sent, "engine_lower": t.bytes_lower, "compute_seconds": t.compute_seconds,
                        "sync_seconds": t.sync_seconds, "subnet_params": ist.subnet_numel(),
                        "engine_received": t.bytes_received})
    mean = mean_over_ranks(accelerator, figures)
    out: dict[str, Any] = {"bytes_sent_per_worker": mean["exchange_sent"],
                           "bytes_received_per_worker": mean["exchange_received"],
                           "total_bytes_sent_per_worker": mean["total_sent"],
                           "total_bytes_received_per_worker": mean["total_received"],
                           "bytes_by_phase": {phase: mean[f"{phase}_sent"] for phase in PHASES}, "bytes_measured": True}
    if args.method == "ist":
        warm = accelerator.dense_warmup_steps * ring_allreduce_bytes(model_params, world)
        # the exchange across groups, as the engine counts it (checked against the wiretap in the tests); what
        # the wiretap saw during syncs also holds the traffic inside each group (G > 1, ZeRO's gathers)
        out.update({"sync_bytes_sent_per_worker": out["bytes_sent_per_worker"],
                    "bytes_sent_per_worker": mean["engine_sent"] + warm,
                    "bytes_received_per_worker": mean["engine_received"] + warm})
        out.update({"rounds": t.rounds, "engine_bytes_sent_per_worker": mean["engine_sent"],
                    "bytes_lower_per_worker": mean["engine_lower"] + warm, "compute_seconds": mean["compute_seconds"],
                    "sync_seconds": mean["sync_seconds"], "subnet_params": mean["subnet_params"],
                    "dense_warmup_steps": accelerator.dense_warmup_steps, "dense_warmup_bytes_per_worker": warm,
                    "ist_config": accelerator.ist_config.to_dict()})
        return out
    syncs = steps if args.method == "ddp" else steps // args.local_steps
    if args.method == "diloco":  # torchft's own process group: not seen by the wiretap; its all-reduce, modeled
        syncs = -(-steps // args.local_steps)  # with the outer step over a round cut short at the end (baselines.py)
        modeled = ring_allreduce_bytes(model_params, world) * syncs
        out.update({"bytes_sent_per_worker": modeled, "bytes_received_per_worker": modeled, "bytes_measured": False})
    out.update({"rounds": syncs, "bytes_lower_per_worker": ring_allreduce_bytes(model_params, world) * syncs,
                "compute_seconds": None, "sync_seconds": None, "subnet_params": model_params})
    return out


def state_bytes(args: argparse.Namespace, accelerator: Accelerator, model: nn.Module,
                optimizer: torch.optim.Optimizer) -> int:
    """Bytes of what a worker keeps for training, as the method counts it (IST: everything
    the engine keeps, :meth:`IST.resident_bytes`; a baseline: parameters, gradients,
    optimizer state). ``live_tensor_bytes`` beside it is counted from outside."""
    if args.method == "ist" and accelerator.ist is not None:
        return sum(accelerator.ist.resident_bytes().values())
    params = list(model.parameters())
    n = sum(p.numel() * p.element_size() for p in params)
    n += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    return n + sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor))


def state_elements(args: argparse.Namespace, accelerator: Accelerator, model: nn.Module,
                   optimizer: torch.optim.Optimizer) -> int:
    """Tensor elements a worker keeps: parameters, gradients, optimizer state (IST: also
    owner shards and what remains of the global model; during a warm-up, the whole model)."""
    if args.method == "ist" and accelerator.ist is not None:
        return accelerator.ist.resident_elements()
    params = list(model.parameters())
    n = sum(p.numel() + (p.grad.numel() if p.grad is not None else 0) for p in params)
    return n + sum(v.numel() for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))


def memory_report(accelerator: Accelerator, peak_state_elements: int, state_bytes: int,
                  live_bytes: int) -> dict[str, Any]:
    """Peaks over ranks (resident set, state elements, CUDA memory) and each rank's
    figures (peak resident bytes, the state it keeps, live tensor bytes)."""
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, peak_state_elements],
                        dtype=torch.float64, device=accelerator.device)
    per_rank = torch.tensor([peak_rss_bytes(), state_bytes, live_bytes],
                            dtype=torch.float64, device=accelerator.device)
    per_rank = accelerator.gather(per_rank).view(-1, 3).tolist()
    peak = accelerator.reduce(peak, "max").tolist()
    if torch.cuda.is_available():
        cuda_peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**20], device=accelerator.device)
        peak.append(accelerator.reduce(cuda_peak, "max").item())
    return {"peak_rss_mib": peak[0], "peak_state_elements": int(peak[1]),
            "peak_cuda_mib": peak[2] if len(peak) > 2 else None,
            "peak_rss_bytes": [int(r[0]) for r in per_rank], "state_bytes": [int(r[1]) for r in per_rank],
            "live_tensor_bytes": [int(r[2]) for r in per_rank]}


def in_phase(tap: Wiretap, phase: str, fn: Any) -> Any:
    """``fn`` with what it sends counted under the wiretap's ``phase``."""

    def counted(*args: Any, **kwargs: Any) -> Any:
        with tap.phase(phase):
            return fn(*args, **kwargs)

    counted.__wrapped__ = fn
    return counted


def count_exchanges(tap: Wiretap, accelerator: Accelerator, model: nn.Module) -> None:
    """Put each method's model synchronization under the wiretap's ``exchange`` phase: DDP's
    gradient buckets (a comm hook, as DDP's default averages them; also a warm-up's and a
    subnet group's DDP), IST's round ends."""
    for candidate in (model, getattr(model, "subnet", None)):
        if isinstance(candidate, DistributedDataParallel):
            candidate.register_comm_hook(None, tap.ddp_hook("exchange"))
    ist = getattr(accelerator, "ist", None)
    if ist is not None and not hasattr(ist.sync, "__wrapped__"):
        ist.sync = in_phase(tap, "exchange", ist.sync)


__all__ = ["PHASES", "accuracy_point", "communication_report", "count_exchanges", "in_phase", "mean_over_ranks",
           "memory_report", "state_bytes", "state_elements"]
