"""The classification loop the recipes share: one ordinary Accelerate loop that runs
``--method ist`` (ISTAccelerator), ``ddp`` (Accelerator) or ``localsgd`` (Accelerate's
``LocalSGD``) with the same data, model, seeds and step budget, and writes
``results.json``. Recipes parse their own defaults and build data and model; this module
does the rest (schedule, checkpoints, resume, W&B, evaluation of the global model)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.local_sgd import LocalSGD
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import checkpoint
from .accelerate import ISTAccelerator
from .accounting import ring_allreduce_bytes
from .init import is_meta, materialize
from .memory import dataset_tensors, live_tensor_bytes, peak_rss_bytes
from .faults import (ISTError, ISTPeerFailure, ISTSyncError, is_communication_error, peer_failed, peer_failures,
                     record_failure, sync_failure)
from .preflight import check_setup
from .wiretap import Wiretap
from .config import DECOMPOSITIONS, OPTIMIZER_STATE_POLICIES, WIRE_DTYPES, ISTConfig

logger = logging.getLogger(__name__)

METHODS = ("ist", "ddp", "localsgd", "diloco")
FAILURE_WAIT_SECONDS = 5.0  # a failing rank waits this long for the others to read why, before it exits
SCHEDULES = ("step", "cosine", "constant")


def add_training_args(parser: argparse.ArgumentParser, **defaults: Any) -> argparse.ArgumentParser:
    """The flags every recipe shares; ``defaults`` overrides their defaults (the recipe's paper setting)."""
    g = parser.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default="ist",
                   help="ist, or a baseline: ddp / Accelerate's LocalSGD / torchft's DiLoCo (outer step: --outer-*)")
    g.add_argument("--num-subnets", type=int, default=None, help="S (default: world size / group size)")
    g.add_argument("--group-size", type=int, default=None,
                   help="G, ranks training one subnet together (default: world size / S, or 1)")
    g.add_argument("--local-steps", type=int, default=50, help="optimizer steps per round (also LocalSGD's)")
    g.add_argument("--min-blocks", type=int, default=0, help="ResIST minimum depth per partitioned stage")
    g.add_argument("--stages", default="longest", help="ResIST stages: longest, all, or e.g. layer3:1-22")
    g.add_argument("--decomposition", choices=DECOMPOSITIONS, default="auto")
    g.add_argument("--init", choices=("real", "meta"), default="real",
                   help="meta: build the model on the meta device; IST then materializes only each rank's subnet "
                        "and owner shard (the baselines materialize the same initial values whole)")
    g.add_argument("--optimizer-state", choices=OPTIMIZER_STATE_POLICIES, default="reset")
    g.add_argument("--wire-dtype", choices=WIRE_DTYPES, default="fp32")
    g.add_argument("--outer-lr", type=float, default=1.0,
                   help="ist: outer SGD lr over each round's pseudo-gradient (1 with momentum 0: plain averaging, "
                        "the papers; DiLoCo: 0.7)")
    g.add_argument("--outer-momentum", type=float, default=0.0, help="ist: outer momentum (DiLoCo: 0.9)")
    g.add_argument("--outer-nesterov", action="store_true", help="ist: Nesterov outer momentum (DiLoCo)")
    g.add_argument("--no-eval-scaling", action="store_true", help="evaluate without the papers' eval scaling")
    g.add_argument("--sync-timeout", type=float, default=600.0,
                   help="seconds a collective waits for a stalled peer before the run fails with ISTSyncError")
    g.add_argument("--dense-warmup-epochs", type=float, default=0.0,
                   help="ist: train the whole model data-parallel this long first (ResIST's ImageNet setting); "
                        "rounded up to whole rounds")
    t = parser.add_argument_group("training")
    t.add_argument("--epochs", type=float, default=1.0, help="training length in epochs (unless --max-steps)")
    t.add_argument("--max-steps", type=int, default=0, help="optimizer steps to train (overrides --epochs)")
    t.add_argument("--batch-size", type=int, default=128, help="per worker")
    t.add_argument("--eval-batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--schedule", choices=SCHEDULES, default="step")
    t.add_argument("--milestones", type=float, nargs="*", default=[0.5, 0.75],
                   help="step schedule: fractions of training where the lr is divided by 10")
    t.add_argument("--lr-warmup-steps", type=int, default=0, help="linear lr warm-up")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--clip-grad-norm", type=float, default=0.0, help="0: no clipping")
    t.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    t.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per process")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-every", type=int, default=0, help="evaluate every this many steps (0: at the end)")
    t.add_argument("--train-seconds", type=float, default=0.0,
                   help="stop at the first evaluation after this much training wall-clock (evaluation excluded; "
                        "needs --eval-every; 0: no limit)")
    t.add_argument("--target-accuracy", type=float, default=0.0,
                   help="stop at the first evaluation that reaches this accuracy (needs --eval-every; 0: never)")
    t.add_argument("--eval-samples", type=int, default=0, help="evaluate on this many items, evenly spaced through the set (0: all)")
    t.add_argument("--val-split", type=float, default=0.0,
                   help="hold out this fraction of the training set (seeded) and evaluate on it instead of the test "
                        "set (its items keep the training transforms): to pick hyper-parameters without the test set")
    t.add_argument("--log-every", type=int, default=10)
    o = parser.add_argument_group("output")
    o.add_argument("--output-dir", default="out")
    o.add_argument("--report-to", choices=("wandb", "none"), default="none")
    o.add_argument("--project", default="ist_accel", help="W&B project")
    o.add_argument("--run-name", default=None)
    o.add_argument("--checkpoint-every", type=int, default=0,
                   help="save_state every this many steps (ist: a multiple of --local-steps); 0: never")
    o.add_argument("--keep-checkpoints", type=int, default=2)
    o.add_argument("--resume", default=None, help="'auto' (latest in OUTPUT_DIR/checkpoints) or a checkpoint folder")
    o.add_argument("--stop-after-steps", type=int, default=0,
                   help="stop abruptly after this many steps, as if the job were killed (to exercise --resume)")
    parser.set_defaults(**defaults)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Clear errors before any process group or file is touched. Of S and G, one given
    (or neither) fills in the other from the world size, so a sweep can vary S alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.group_size is None:
        args.group_size = world // args.num_subnets if args.num_subnets and args.num_subnets > 0 else 1
        args.group_size = max(args.group_size, 1)
    for name in ("local_steps", "batch_size", "eval_batch_size", "grad_accum", "group_size", "log_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "checkpoint_every", "eval_every", "stop_after_steps", "lr_warmup_steps", "min_blocks",
                 "eval_samples"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.epochs <= 0 and args.max_steps == 0:
        raise SystemExit(f"--epochs must be > 0 (or give --max-steps), got {args.epochs}")
    if args.dense_warmup_epochs and getattr(args, "init", "real") == "meta":
        raise SystemExit("--dense-warmup-epochs trains the whole model on every rank; it needs --init real")
    if args.dense_warmup_epochs < 0 or (args.dense_warmup_epochs and args.method != "ist"):
        raise SystemExit(f"--dense-warmup-epochs must be >= 0 and needs --method ist, got {args.dense_warmup_epochs} "
                         f"with --method {args.method}")
    _check_number("--lr", args.lr, "a finite number > 0", lambda v: v > 0)
    _check_number("--momentum", args.momentum, "a finite number in [0, 1)", lambda v: 0 <= v < 1)
    _check_number("--weight-decay", args.weight_decay, "a finite number >= 0", lambda v: v >= 0)
    _check_number("--sync-timeout", args.sync_timeout, "a finite number of seconds > 0", lambda v: v > 0)
    _check_number("--clip-grad-norm", args.clip_grad_norm, "a finite number >= 0 (0: no clipping)", lambda v: v >= 0)
    _check_number("--epochs", args.epochs, "a finite number", lambda v: True)
    _check_number("--dense-warmup-epochs", args.dense_warmup_epochs, "a finite number >= 0", lambda v: v >= 0)
    _check_number("--val-split", getattr(args, "val_split", 0.0), "a fraction in [0, 1)", lambda v: 0 <= v < 1)
    _check_number("--train-seconds", args.train_seconds, "a finite number of seconds >= 0 (0: no limit)",
                  lambda v: v >= 0)
    _check_number("--target-accuracy", args.target_accuracy, "an accuracy in [0, 1] (0: never stop early)",
                  lambda v: 0 <= v <= 1)
    if (args.train_seconds or args.target_accuracy) and not args.eval_every:
        raise SystemExit("--train-seconds and --target-accuracy are checked at evaluations: give --eval-every N")
    _check_number("--outer-lr", args.outer_lr, "a finite number > 0", lambda v: v > 0)
    _check_number("--outer-momentum", args.outer_momentum, "a finite number in [0, 1)", lambda v: 0 <= v < 1)
    if args.outer_nesterov and args.outer_momentum == 0:
        raise SystemExit("--outer-nesterov needs --outer-momentum > 0 (DiLoCo: 0.9)")
    if args.method not in ("ist", "diloco") and (args.outer_lr != 1.0 or args.outer_momentum or args.outer_nesterov):
        raise SystemExit(f"--outer-lr/--outer-momentum/--outer-nesterov need --method ist or diloco, got --method "
                         f"{args.method}")
    if not all(0 < m < 1 for m in args.milestones):
        raise SystemExit(f"--milestones are fractions of training in (0, 1), got {args.milestones}")
    if args.method == "ist" and args.checkpoint_every % args.local_steps:
        raise SystemExit(f"--checkpoint-every {args.checkpoint_every} must be a multiple of --local-steps "
                         f"{args.local_steps}: IST checkpoints are taken at round ends")
    if args.method == "ist":
        if world % args.group_size:
            raise SystemExit(f"world size {world} is not a multiple of --group-size {args.group_size}")
        if args.num_subnets is None:
            args.num_subnets = world // args.group_size
        try:
            ist_config(args).check_world_size(world)
        except ValueError as error:
            raise SystemExit(f"bad IST setting: {error}") from None
    if getattr(args, "data", None) is not None and not Path(args.data).exists():
        raise SystemExit(f"--data {args.data}: no such file or folder (give an ImageFolder root with train/ and "
                         "val/ or test/, a tarball of one, or, for ist_mlp.py, a folder of MNIST idx files)")
    check_output_dir(args.output_dir)


def _check_number(flag: str, value: float, accepted: str, ok) -> None:
    if not math.isfinite(value) or not ok(value):
        raise SystemExit(f"{flag} must be {accepted}, got {value}")


def check_output_dir(path: str | Path, flag: str = "--output-dir") -> None:
    """Refuse an output folder that is an existing file or cannot be written, by creating and
    removing a probe in it (or, when it does not exist yet, in its nearest existing parent):
    nothing is left behind and the folder itself is not created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SystemExit(f"{flag} {path} is an existing file, not a folder; choose a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise SystemExit(f"{flag} {path} cannot be created: {existing} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".ist_write_probe_", dir=existing)
        os.rmdir(probe)
    except OSError as error:
        where = "" if existing == path else f" (its nearest existing parent {existing} is not writable)"
        raise SystemExit(f"{flag} {path} cannot be written{where}: {error.strerror or error}") from None


@contextlib.contextmanager
def data_errors() -> Any:
    """Data that cannot be read (a missing folder, a wrong layout, no images) as a one-line
    error rather than a traceback, before any process group exists."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise SystemExit(f"cannot load the data: {error}") from None


def ist_config(args: argparse.Namespace) -> ISTConfig:
    try:
        return ISTConfig(
            num_subnets=args.num_subnets, local_steps=args.local_steps, min_blocks=args.min_blocks,
            decomposition=args.decomposition, stages=args.stages, optimizer_state=args.optimizer_state,
            group_size=args.group_size, seed=args.seed, eval_scaling=not args.no_eval_scaling,
            wire_dtype=args.wire_dtype, sync_timeout=getattr(args, "sync_timeout", 600.0),
            outer_lr=args.outer_lr, outer_momentum=args.outer_momentum, outer_nesterov=args.outer_nesterov,
        )
    except ValueError as error:
        raise SystemExit(f"bad IST setting: {error}") from None


def preflight(args: argparse.Namespace, model: nn.Module, example_input: torch.Tensor | None = None) -> None:
    """The model against the IST settings, before any process group or file exists."""
    if args.method == "ist":
        try:
            check_setup(model, ist_config(args), int(os.environ.get("WORLD_SIZE", "1")), example_input)
        except ValueError as error:
            raise SystemExit(f"bad IST setting for this model: {error}") from None


def make_accelerator(
    args: argparse.Namespace, example_input: torch.Tensor | None = None, trackers: Sequence[Any] = ()
) -> Accelerator:
    """The run's accelerator; ``trackers`` are extra Accelerate trackers beside ``--report-to``."""
    log_with = (["wandb"] if args.report_to == "wandb" else []) + list(trackers)
    kwargs: dict[str, Any] = dict(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum,
        log_with=log_with or None,
        project_dir=args.output_dir,
        step_scheduler_with_optimizer=False,  # the schedule is written in optimizer steps
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # resumable shuffles
        cpu=not torch.cuda.is_available(),
    )
    if args.method == "ist":
        return ISTAccelerator(ist_config(args), example_input=example_input, **kwargs)
    return Accelerator(**kwargs)


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


def evaluate(accelerator: Accelerator, model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy over the whole eval set. For IST, ``model.eval()`` switches to the
    averaged global model in its evaluation view (every rank, a collective)."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            pred = model(x).argmax(-1)
            pred, y = accelerator.gather_for_metrics((pred, y))
            correct += int((pred == y).sum())
            total += len(y)
    model.train()
    return correct / max(total, 1)


def train_classifier(
    args: argparse.Namespace,
    model: nn.Module,
    train_set: Dataset,
    eval_set: Dataset,
    example_input: torch.Tensor | None = None,
    trackers: Sequence[Any] = (),
) -> dict[str, Any] | None:
    """Train and evaluate; returns the results (also written to ``OUTPUT_DIR/results.json``
    on the main process), or ``None`` when ``--stop-after-steps`` cut the run short."""
    preflight(args, model, example_input)
    accelerator = make_accelerator(args, example_input, trackers)
    try:
        return _train(args, accelerator, model, train_set, eval_set)
    except Exception as error:
        reported = _reported(error)
        if reported is error:
            raise
        raise reported from error


def _reported(error: Exception) -> Exception:
    """A failure, told to the other ranks (or, if a peer failed first, with its reason):
    every rank stops with the message of the rank whose failure started it."""
    if not isinstance(error, ISTError) and is_communication_error(error):  # a gather, barrier or store outside
        error = sync_failure(error)  # the round engine (evaluation, checkpoint): the engine's ISTSyncError
    logger.error("%s: %s", type(error).__name__, error)  # now, not after the wait below
    if isinstance(error, ISTPeerFailure):
        return error
    peers = peer_failures()
    if isinstance(error, ISTSyncError):  # a consequence (a peer died or stalled), not a cause to tell the others
        if peers and not all(p in str(error) for p in peers):
            return ISTSyncError(f"{error}. Reported by the peer(s): {'; '.join(peers)}")
        return error
    if not peers:  # this rank's own failure: the others stop with its message
        record_failure(f"{type(error).__name__}: {error}", wait_for_peers=FAILURE_WAIT_SECONDS)
    return error


def _stop_if_a_peer_failed() -> None:
    if peer_failed():
        reasons = "; ".join(peer_failures()) or "no reason recorded"
        raise ISTPeerFailure(f"stopping: another rank failed ({reasons})")


def _train(args, accelerator, model, train_set, eval_set) -> dict[str, Any] | None:
    tap = Wiretap().install()  # every byte this rank moves, by phase (setup, train, exchange, eval, save)
    try:
        return _run(args, accelerator, model, train_set, eval_set, tap)
    finally:
        tap.uninstall()


def model_context(args: argparse.Namespace) -> Any:
    """Where a recipe builds its model: on the meta device under ``--init meta``."""
    return torch.device("meta") if getattr(args, "init", "real") == "meta" else contextlib.nullcontext()


def held_out_split(train_set: Dataset, fraction: float, seed: int,
                   eval_set: Dataset | None = None) -> tuple[Dataset, Dataset]:
    """``--val-split``: a seeded ``fraction`` of ``train_set`` held out; (the rest, the held-out part).

    The held-out part is scored as the test set is: where both sets have a ``transform``
    (image folders), it reads the training images through ``eval_set``'s, not the training
    augmentation (a random crop and flip would make each evaluation a different draw)."""
    held = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = max(1, int(len(train_set) * fraction))
    scored = train_set
    if eval_set is not None and hasattr(train_set, "transform") and hasattr(eval_set, "transform"):
        scored = copy.copy(train_set)  # the same files, read as the test set is
        scored.transform = eval_set.transform
    return torch.utils.data.Subset(train_set, held[cut:]), torch.utils.data.Subset(scored, held[:cut])


def evenly_spaced(dataset, count: int):
    """``count`` items spread evenly through ``dataset``: a class-sorted ImageFolder's first
    ``count`` would be its first classes only."""
    n, count = len(dataset), min(count, len(dataset))
    return torch.utils.data.Subset(dataset, [i * n // count for i in range(count)])


def _run(args, accelerator, model, train_set, eval_set, tap: Wiretap) -> dict[str, Any] | None:
    set_seed(args.seed)
    if is_meta(model) and args.method != "ist":  # a baseline holds the whole model: the same initial values
        model = materialize(model, args.seed)
    if getattr(args, "val_split", 0.0):  # a held-out part of the training set takes the test set's place
        train_set, eval_set = held_out_split(train_set, args.val_split, args.seed, eval_set)
    if getattr(args, "eval_samples", 0):
        eval_set = evenly_spaced(eval_set, args.eval_samples)
    output = Path(args.output_dir)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              num_workers=args.num_workers)
    eval_loader = DataLoader(eval_set, batch_size=args.eval_batch_size, num_workers=args.num_workers)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, momentum=args.momentum)
    batches_per_epoch = len(train_loader) // accelerator.num_processes
    total_steps = args.max_steps or max(1, int(args.epochs * batches_per_epoch) // args.grad_accum)
    if args.dense_warmup_epochs:  # whole rounds, so round ends stay on multiples of --local-steps
        warm = math.ceil(args.dense_warmup_epochs * batches_per_epoch / args.grad_accum / args.local_steps)
        accelerator.dense_warmup_steps = warm * args.local_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.schedule, total_steps, args.lr_warmup_steps, args.milestones))
    model_params = sum(p.numel() for p in model.parameters())
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)
    _count_exchanges(tap, accelerator, model)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    accelerator.register_for_checkpointing(tap)  # a resumed run goes on counting
    if args.resume:
        _resume(accelerator, args, output)
    if accelerator.log_with:
        accelerator.init_trackers(args.project, config=vars(args),
                                  init_kwargs={"wandb": {"name": args.run_name, "dir": str(output)}})
    local_sgd = (LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=args.local_steps)
                 if args.method == "localsgd" else _NoLocalSGD())  # LocalSGD refuses DeepSpeed even when off
    if args.method == "diloco":  # torchft's, its outer step from --outer-* (DiLoCo's 0.7 / 0.9 / Nesterov if unset)
        from .baselines import TorchftDiLoCo

        plain = args.outer_lr == 1.0 and not args.outer_momentum
        local_sgd = TorchftDiLoCo(accelerator, model, optimizer, args.local_steps,
                                  0.7 if plain else args.outer_lr, 0.9 if plain else args.outer_momentum,
                                  True if plain else args.outer_nesterov, timeout=args.sync_timeout)
    if args.method == "localsgd":  # its syncs (and the one more at __exit__) are its exchange
        local_sgd._sync_and_avg_model_params = _in_phase(tap, "exchange", local_sgd._sync_and_avg_model_params)
    with tap.phase("train"):
        results = _loop(args, accelerator, model, optimizer, scheduler, train_loader, eval_loader, progress,
                        total_steps, batches_per_epoch, local_sgd, model_params, tap,
                        dataset_tensors(train_set, eval_set))
    if results is None:
        return None
    with tap.phase("save"):
        accelerator.save_model(model, output / "model")
    with tap.phase("report"):
        results.update(_communication(args, accelerator, model_params, progress.step, tap))
    results["model_params"] = model_params
    results["evaluated_on"] = {"split": "held-out train" if getattr(args, "val_split", 0.0) else "test",
                               "items": len(eval_set)}
    if accelerator.is_main_process:
        (output / "results.json").write_text(json.dumps(results, indent=2))
        logger.info("results: %s", json.dumps(results))
    accelerator.end_training()
    return results


def _in_phase(tap: Wiretap, phase: str, fn: Any) -> Any:
    def counted(*args: Any, **kwargs: Any) -> Any:
        with tap.phase(phase):
            return fn(*args, **kwargs)

    counted.__wrapped__ = fn
    return counted


def _count_exchanges(tap: Wiretap, accelerator: Accelerator, model: nn.Module) -> None:
    """Put each method's model synchronization under the wiretap's ``exchange`` phase: DDP's
    gradient buckets (a comm hook, as DDP's default averages them; also a warm-up's and a
    subnet group's DDP), IST's round ends."""
    from torch.nn.parallel import DistributedDataParallel

    for candidate in (model, getattr(model, "subnet", None)):
        if isinstance(candidate, DistributedDataParallel):
            candidate.register_comm_hook(None, tap.ddp_hook("exchange"))
    ist = getattr(accelerator, "ist", None)
    if ist is not None and not hasattr(ist.sync, "__wrapped__"):
        ist.sync = _in_phase(tap, "exchange", ist.sync)


def _loop(args, accelerator, model, optimizer, scheduler, train_loader, eval_loader, progress, total_steps,
          batches_per_epoch, local_sgd, model_params, tap, data_tensors) -> dict[str, Any] | None:
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=progress.step, disable=not accelerator.is_local_main_process,
               desc=f"{args.method}", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
    started = time.perf_counter()
    loss_sum, loss_count, accuracy = 0.0, 0, None
    history: list[dict[str, float]] = []  # accuracy against samples, bytes and seconds, at every evaluation
    eval_time = 0.0
    state_elements = live_bytes = state_bytes = 0
    limited = False  # --train-seconds spent or --target-accuracy reached
    model.train()
    with local_sgd:
        while progress.step < total_steps and not limited:
            epoch, skip = divmod(progress.batches_seen, batches_per_epoch)
            loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
            loader.set_epoch(epoch)
            for x, y in loader:
                with accelerator.accumulate(model):
                    loss = nn.functional.cross_entropy(model(x), y)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.clip_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
                    if accelerator.sync_gradients:  # gradients exist: the per-worker state at its peak
                        state_elements = max(state_elements, _state_elements(args, accelerator, model, optimizer))
                        if progress.step + 1 == total_steps and progress.step:  # every buffer and state exists
                            live_bytes = live_tensor_bytes(exclude=data_tensors)
                            state_bytes = _state_bytes(args, accelerator, model, optimizer)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                progress.batches_seen += 1
                loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
                if not accelerator.sync_gradients:
                    continue
                progress.step += 1
                if args.method == "ist" and accelerator.ist is not None and not hasattr(accelerator.ist.sync, "__wrapped__"):
                    _count_exchanges(tap, accelerator, model)  # IST began after a data-parallel warm-up
                _stop_if_a_peer_failed()  # one store round trip: every rank stops with the failing rank's reason
                local_sgd.step()
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
                        accuracy = evaluate(accelerator, model, eval_loader)
                        history.append(_point(args, accelerator, progress, accuracy,
                                              eval_started - started - eval_time, eval_time, tap))
                    eval_time += time.perf_counter() - eval_started
                    accelerator.log({"eval/accuracy": accuracy}, step=step)
                    bar.write(f"step {step}: eval accuracy {accuracy:.4f}") if accelerator.is_main_process else None
                    limited = _reached_a_limit(args, history[-1])  # the same figures on every rank: all stop here
                    if limited:
                        break
                if args.checkpoint_every and step % args.checkpoint_every == 0:
                    with tap.phase("save"):
                        _checkpoint(accelerator, args, step)
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
        accuracy = evaluate(accelerator, model, eval_loader)
        history.append(_point(args, accelerator, progress, accuracy, train_seconds, eval_time, tap))
    accelerator.log({"eval/accuracy": accuracy}, step=progress.step)
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, state_elements],
                        dtype=torch.float64, device=accelerator.device)
    per_rank = torch.tensor([peak_rss_bytes(), state_bytes, live_bytes],
                            dtype=torch.float64, device=accelerator.device)
    per_rank = accelerator.gather(per_rank).view(-1, 3).tolist()
    peak = accelerator.reduce(peak, "max").tolist()
    if torch.cuda.is_available():
        cuda_peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**20], device=accelerator.device)
        peak.append(accelerator.reduce(cuda_peak, "max").item())
    return {"method": args.method, "final_accuracy": accuracy, "steps": progress.step,
            "samples_per_worker": progress.batches_seen * args.batch_size,
            "world_size": accelerator.num_processes, "train_seconds": train_seconds, "history": history,
            "peak_rss_mib": peak[0], "peak_state_elements": int(peak[1]),
            "peak_cuda_mib": peak[2] if len(peak) > 2 else None,
            "peak_rss_bytes": [int(r[0]) for r in per_rank], "state_bytes": [int(r[1]) for r in per_rank],
            "live_tensor_bytes": [int(r[2]) for r in per_rank]}


def _reached_a_limit(args, point: dict[str, float]) -> bool:
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


def _state_bytes(args, accelerator, model, optimizer) -> int:
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


def _state_elements(args, accelerator, model, optimizer) -> int:
    """Tensor elements a worker keeps: parameters, gradients, optimizer state (IST: also
    owner shards and what remains of the global model; during a warm-up, the whole model)."""
    if args.method == "ist" and accelerator.ist is not None:
        return accelerator.ist.resident_elements()
    params = list(model.parameters())
    n = sum(p.numel() + (p.grad.numel() if p.grad is not None else 0) for p in params)
    return n + sum(v.numel() for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))


class _NoLocalSGD(contextlib.nullcontext):
    def step(self) -> None:
        pass


def _point(args, accelerator, progress, accuracy: float, wall: float, eval_seconds: float,
           tap: Wiretap) -> dict[str, float]:
    """One point of the accuracy curve (means over ranks): samples, exchange bytes sent per
    worker so far (the wiretap's count), ``wall_seconds``, the training loop's wall-clock so far
    with every method's syncs and without evaluation (the same clock for every method),
    ``eval_seconds`` the evaluations' so far, and ``compute_seconds`` (IST: the engine's
    measured compute without its syncs; a baseline: its wall time, syncs included)."""
    compute = accelerator.ist.totals.compute_seconds if args.method == "ist" and accelerator.ist is not None else wall
    mean = accelerator.reduce(torch.tensor([tap.sent.get("exchange", 0.0), compute, wall, eval_seconds],
                                           dtype=torch.float64, device=accelerator.device), "mean").tolist()
    return {"step": progress.step, "samples_per_worker": progress.batches_seen * args.batch_size,
            "accuracy": accuracy, "bytes_sent_per_worker": mean[0], "compute_seconds": mean[1],
            "wall_seconds": mean[2], "eval_seconds": mean[3]}


def _communication(args, accelerator, model_params: int, steps: int, tap: Wiretap) -> dict[str, Any]:
    """Bytes per worker for the whole run (mean over ranks), all measured by the wiretap:
    ``bytes_*_per_worker`` the method's model synchronization (IST's round ends; DDP's
    gradients; LocalSGD's syncs, with the one more at the end), ``total_bytes_*`` every
    byte (also set-up broadcasts, DDP's buffer broadcasts, agreement checks, evaluation and
    saving gathers), ``bytes_by_phase`` where they went. ``bytes_lower_per_worker``: IST's
    lower bound; for the baselines the ring all-reduce of the parameters per sync."""
    world = accelerator.num_processes
    phases = ("setup", "train", "exchange", "eval", "save")
    counts = [tap.sent.get("exchange", 0.0), tap.received.get("exchange", 0.0), *tap.total(),
              *(tap.sent.get(p, 0.0) for p in phases)]
    out: dict[str, Any] = {}
    if args.method == "ist":
        ist = accelerator.ist
        t = ist.totals
        counts += [t.bytes_sent, t.bytes_lower, t.compute_seconds, t.sync_seconds, ist.subnet_numel(), t.bytes_received]
    mean = accelerator.reduce(torch.tensor(counts, dtype=torch.float64, device=accelerator.device), "mean").tolist()
    out.update({"bytes_sent_per_worker": mean[0], "bytes_received_per_worker": mean[1],
                "total_bytes_sent_per_worker": mean[2], "total_bytes_received_per_worker": mean[3],
                "bytes_by_phase": dict(zip(phases, mean[4:9])), "bytes_measured": True})
    if args.method == "ist":
        warm = accelerator.dense_warmup_steps * ring_allreduce_bytes(model_params, world)
        # the exchange across groups, as the engine counts it (checked against the wiretap in the tests); what
        # the wiretap saw during syncs also holds the traffic inside each group (G > 1, ZeRO's gathers)
        out.update({"sync_bytes_sent_per_worker": out["bytes_sent_per_worker"],
                    "bytes_sent_per_worker": mean[9] + warm, "bytes_received_per_worker": mean[14] + warm})
        out.update({"rounds": t.rounds, "engine_bytes_sent_per_worker": mean[9], "bytes_lower_per_worker": mean[10] + warm,
                    "compute_seconds": mean[11], "sync_seconds": mean[12], "subnet_params": mean[13],
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


def _checkpoint_root(output: Path) -> Path:
    return output / "checkpoints"


def _checkpoint(accelerator: Accelerator, args: argparse.Namespace, step: int) -> None:
    root = _checkpoint_root(Path(args.output_dir))
    accelerator.save_state(str(root / f"step_{step:08d}"))
    if accelerator.is_main_process and args.keep_checkpoints > 0:
        for old in _complete_checkpoints(root)[: -args.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _resume(accelerator: Accelerator, args: argparse.Namespace, output: Path) -> None:
    if args.resume != "auto":
        accelerator.load_state(args.resume)
        return
    found = _complete_checkpoints(_checkpoint_root(output))
    if not found:
        logger.info("--resume auto: no complete checkpoint in %s, starting fresh", _checkpoint_root(output))
        return
    for folder in reversed(found):  # the newest checkpoint that verifies (every rank reads the same files)
        try:
            checkpoint.verify(folder)
        except checkpoint.CheckpointError as error:
            logger.warning("--resume auto: skipping the damaged checkpoint %s (%s); trying an older one", folder, error)
            continue
        logger.info("--resume auto: resuming from %s", folder)
        accelerator.load_state(str(folder))
        return
    raise checkpoint.CheckpointError(f"--resume auto: every checkpoint in {_checkpoint_root(output)} is damaged "
                                     f"({', '.join(p.name for p in found)}); remove them to start fresh")


def _complete_checkpoints(root: Path) -> list[Path]:
    """``step_*`` folders with a manifest, oldest first (an interrupted save has none)."""
    return sorted(p for p in root.glob("step_*") if checkpoint.is_complete(p))


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)


def finish(code: int = 0) -> None:
    """End a recipe process: flush, leave the process group, and exit without running
    interpreter teardown, where gloo sometimes aborts after the work is done."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


__all__ = ["METHODS", "Progress", "add_training_args", "check_args", "check_output_dir", "data_errors", "evaluate",
           "finish", "ist_config",
           "lr_lambda", "make_accelerator", "preflight", "setup_logging", "train_classifier"]
