"""The recipes' training loop: one ordinary Accelerate loop for every method (IST through
``ISTAccelerator``, or a baseline), with gradient accumulation, the lr schedule, periodic
evaluation of the global model, early stops, checkpoints and the memory peaks."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from ..memory import live_tensor_bytes
from ..norm_statistics import recomputed_batchnorm
from ..wiretap import Wiretap
from .checkpoints import save_checkpoint
from .local_data import LocalEval
from .process import stop_if_a_peer_failed
from .report import accuracy_point, count_exchanges, memory_report, state_bytes, state_elements

logger = logging.getLogger(__name__)


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int, milestones: Sequence[float]):
    """Multiplier of the base lr after ``step`` optimizer steps."""
    marks = [int(m * total_steps) for m in milestones]

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        if schedule == "step":
            return warm * 0.1 ** sum(step >= m for m in marks)
        if schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
        return warm

    return factor


class Progress:
    """Where the loop stands (saved with every checkpoint)."""

    def __init__(self) -> None:
        self.step = 0
        self.batches_seen = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "batches_seen": self.batches_seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.batches_seen = int(state["step"]), int(state["batches_seen"])


class NoPeriodicSync(contextlib.nullcontext):
    """Stands where ``LocalSGD`` / DiLoCo would for a method without periodic averaging."""

    def step(self) -> None:
        pass


@dataclass
class Run:
    """What the loop trains with: the prepared objects, the step budget, and where it stands."""

    accelerator: Accelerator
    model: nn.Module
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loader: Any  # a prepared DataLoader, LocalEval (node-local evaluation sets) or MainProcessEval
    progress: Progress
    total_steps: int
    batches_per_epoch: int  # of this rank's loader (node-local sets: its own, not the budget's)
    periodic_sync: Any  # LocalSGD, DiLoCo, or NoPeriodicSync
    tap: Wiretap
    data_tensors: Any  # the datasets' own tensors, left out of the live-tensor count
    norm_batches: Sequence[torch.Tensor] = ()  # --recompute-bn: this rank's batches for the statistics


def evaluate(accelerator: Accelerator, model: nn.Module, loader: DataLoader | LocalEval,
             norm_batches: Sequence[torch.Tensor] = ()) -> float:
    """Top-1 accuracy over the whole eval set (node-local sets: over every rank's own,
    :class:`LocalEval`). For IST, ``model.eval()`` switches to the averaged global model in
    its evaluation view (every rank, a collective). With ``norm_batches`` the scored model's
    BatchNorm statistics are recomputed over every rank's batches first
    (:func:`~ist_accel.norm_statistics.recomputed_batchnorm`) and put back after."""
    if isinstance(loader, MainProcessEval):
        if not getattr(accelerator, "in_warmup", False):
            return loader.accuracy(accelerator)
        loader = loader.everywhere  # a data-parallel warm-up: every rank holds the whole model
    model.eval()
    recomputed = (recomputed_batchnorm(accelerator.unwrap_model(model), norm_batches) if norm_batches
                  else contextlib.nullcontext())
    with recomputed:
        accuracy = (loader.accuracy(accelerator, model) if isinstance(loader, LocalEval)
                    else _accuracy(accelerator, model, loader))
    model.train()
    return accuracy


class MainProcessEval:
    """``--eval-on main``: IST's global model is put together on the main process only (each
    rank sends its part once) and scored there on the whole evaluation set; the score is
    broadcast."""

    def __init__(self, dataset: Any, batch_size: int, everywhere: DataLoader) -> None:
        self.loader = DataLoader(dataset, batch_size=batch_size)
        self.everywhere = everywhere  # the prepared, sharded loader (a warm-up scores with it)

    def accuracy(self, accelerator: Accelerator) -> float:
        score = torch.zeros(1, dtype=torch.float64, device=accelerator.device)
        with accelerator.eval_global(dst=0) as model:
            if model is not None:
                correct = total = 0
                with torch.no_grad():
                    for x, y in self.loader:
                        x, y = x.to(accelerator.device), y.to(accelerator.device)
                        correct += int((model(x).argmax(-1) == y).sum())
                        total += len(y)
                score[0] = correct / max(total, 1)
            dist.broadcast(score, 0)  # (inside: the other ranks' wait is evaluation time too)
        return float(score[0])


def _accuracy(accelerator: Accelerator, model: nn.Module, loader: DataLoader) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            pred = model(x).argmax(-1)
            pred, y = accelerator.gather_for_metrics((pred, y))
            correct += int((pred == y).sum())
            total += len(y)
    return correct / max(total, 1)


def reached_a_limit(args: argparse.Namespace, point: dict[str, float]) -> bool:
    """--target-accuracy reached or --train-seconds spent, at an evaluation (its figures are
    means over ranks, so every rank decides alike)."""
    if args.target_accuracy and point["accuracy"] >= args.target_accuracy:
        logger.info("target accuracy %.4f reached at step %d (%.1f s)", args.target_accuracy, point["step"],
                    point["wall_seconds"])
        return True
    if args.train_seconds and point["wall_seconds"] >= args.train_seconds:
        logger.info("training budget of %.0f s spent at step %d", args.train_seconds, point["step"])
        return True
    return False


def train_loop(args: argparse.Namespace, run: Run) -> dict[str, Any] | None:
    """Train to the step budget (or an early stop) and score the final model; the results
    without the communication report, or ``None`` when ``--stop-after-steps`` cut it short."""
    from tqdm.auto import tqdm

    accelerator, model, optimizer, progress, tap = run.accelerator, run.model, run.optimizer, run.progress, run.tap
    total_steps, batches_per_epoch = run.total_steps, run.batches_per_epoch
    bar = tqdm(total=total_steps, initial=progress.step, disable=not accelerator.is_local_main_process,
               desc=f"{args.method}", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
    started = time.perf_counter()
    loss_sum, loss_count, accuracy = 0.0, 0, None
    history: list[dict[str, float]] = []  # accuracy against samples, bytes and seconds, at every evaluation
    eval_time = 0.0
    peak_elements = live_bytes = kept_bytes = 0
    limited = False  # --train-seconds spent or --target-accuracy reached
    model.train()
    with run.periodic_sync:
        while progress.step < total_steps and not limited:
            epoch, skip = divmod(progress.batches_seen, batches_per_epoch)
            loader = accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
            loader.set_epoch(epoch)
            if hasattr(loader.dataset, "set_epoch"):  # (Accelerate skips it for a loader resumed mid-epoch)
                loader.dataset.set_epoch(epoch)
            for x, y in loader:
                with accelerator.accumulate(model):
                    loss = nn.functional.cross_entropy(model(x), y)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.clip_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
                    if accelerator.sync_gradients:  # gradients exist: the per-worker state at its peak
                        peak_elements = max(peak_elements, state_elements(args, accelerator, model, optimizer))
                        if progress.step + 1 == total_steps and progress.step:  # every buffer and state exists
                            live_bytes = live_tensor_bytes(exclude=run.data_tensors)
                            kept_bytes = state_bytes(args, accelerator, model, optimizer)
                    optimizer.step()
                    run.scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                progress.batches_seen += 1
                loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
                if not accelerator.sync_gradients:
                    continue
                progress.step += 1
                if args.method == "ist" and accelerator.ist is not None and not hasattr(accelerator.ist.sync, "__wrapped__"):
                    count_exchanges(tap, accelerator, model)  # IST began after a data-parallel warm-up
                stop_if_a_peer_failed()  # one store round trip: every rank stops with the failing rank's reason
                run.periodic_sync.step()
                bar.update(1)
                step = progress.step
                if step % args.log_every == 0 or step == total_steps:
                    lr = optimizer.param_groups[0]["lr"]
                    accelerator.log({"train/loss": loss_sum / loss_count, "train/lr": lr,
                                     "train/epoch": progress.batches_seen / batches_per_epoch}, step=step)
                    bar.set_postfix(loss=f"{loss_sum / loss_count:.3f}", lr=f"{lr:.3g}")
                    loss_sum, loss_count = 0.0, 0
                if args.eval_every and step % args.eval_every == 0 and step < total_steps:
                    eval_started = time.perf_counter()
                    with tap.phase("eval"):
                        accuracy = evaluate(accelerator, model, run.eval_loader, run.norm_batches)
                        history.append(accuracy_point(args, accelerator, progress.step, progress.batches_seen, accuracy,
                                                      eval_started - started - eval_time, eval_time, tap))
                    eval_time += time.perf_counter() - eval_started
                    accelerator.log({"eval/accuracy": accuracy}, step=step)
                    bar.write(f"step {step}: eval accuracy {accuracy:.4f}") if accelerator.is_main_process else None
                    limited = reached_a_limit(args, history[-1])  # the same figures on every rank: all stop here
                    if limited:
                        break
                if args.checkpoint_every and step % args.checkpoint_every == 0:
                    with tap.phase("save"):
                        save_checkpoint(accelerator, args, step)
                if args.stop_after_steps and step == args.stop_after_steps:
                    bar.close()
                    logger.warning("stopping abruptly after %d steps (--stop-after-steps)", step)
                    return None
                if step >= total_steps:
                    break
    bar.close()
    if getattr(accelerator, "ist", None) is not None:  # a last, shorter round reaches the model that is scored and
        accelerator.ist.finish()  # saved, and its bytes are counted, as LocalSGD's sync at exit and DiLoCo's last step
    train_seconds = time.perf_counter() - started - eval_time
    with tap.phase("eval"):
        accuracy = evaluate(accelerator, model, run.eval_loader, run.norm_batches)
        history.append(accuracy_point(args, accelerator, progress.step, progress.batches_seen, accuracy,
                                      train_seconds, eval_time, tap))
    accelerator.log({"eval/accuracy": accuracy}, step=progress.step)
    memory = memory_report(accelerator, peak_elements, kept_bytes, live_bytes)
    return {"method": args.method, "final_accuracy": accuracy, "steps": progress.step,
            "samples_per_worker": progress.batches_seen * args.batch_size,
            "world_size": accelerator.num_processes, "train_seconds": train_seconds, "history": history, **memory}


__all__ = ["MainProcessEval", "NoPeriodicSync", "Progress", "Run", "evaluate", "lr_lambda", "reached_a_limit", "train_loop"]
