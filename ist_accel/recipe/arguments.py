"""The recipes' command line: the flags every recipe shares (method, training, output),
their checks before any process group or file is touched, and the :class:`ISTConfig` and
model checks they imply."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DECOMPOSITIONS, OPTIMIZER_STATE_POLICIES, WIRE_DTYPES, ISTConfig
from ..data.partition import parse_split
from ..node_local import check_local_path, is_local_template, local_source
from ..preflight import check_setup

METHODS = ("ist", "ddp", "localsgd", "diloco")
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
    g.add_argument("--wire-dtype", choices=WIRE_DTYPES, default="fp32",
                   help="ist: the exchange's dtype; int8 / int4 / fp8: codes with a scale per --wire-block elements")
    g.add_argument("--wire-block", type=int, default=64, help="ist: elements per scale of a quantized wire")
    g.add_argument("--outer-lr", type=float, default=1.0,
                   help="ist: outer SGD lr over each round's pseudo-gradient (1 with momentum 0: plain averaging, "
                        "the papers; DiLoCo: 0.7)")
    g.add_argument("--outer-momentum", type=float, default=0.0, help="ist: outer momentum (DiLoCo: 0.9)")
    g.add_argument("--outer-nesterov", action="store_true", help="ist: Nesterov outer momentum (DiLoCo)")
    g.add_argument("--assignment", choices=("random", "rotate"), default="random",
                   help="ist: a fresh random decomposition every round (the papers), or one drawn every S rounds "
                        "whose parts move on by one subnet each round (every unit meets every node's data)")
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
    t.add_argument("--eval-on", choices=("all", "main"), default="all",
                   help="ist: score the global model on every rank, each on its shard of the eval set (every rank "
                        "receives the units it lacks), or on the main process alone (each rank sends its part once: "
                        "fewer bytes, a longer evaluation)")
    t.add_argument("--recompute-bn", type=int, default=0, metavar="BATCHES",
                   help="before each evaluation, set the scored model's BatchNorm statistics to those of its "
                        "activations over BATCHES batches of every rank's own training data (per-channel sums, one "
                        "small all-reduce per norm; the trained statistics are put back after): for skewed data "
                        "(0: score with the statistics as trained)")
    t.add_argument("--log-every", type=int, default=10)
    p = parser.add_argument_group("data placement (node-local data, skewed splits: docs/recipes.md#node-local-data)")
    p.add_argument("--split", default="iid",
                   help="iid (default: one set sharded over all ranks), dirichlet:ALPHA or classes:K: a seeded "
                        "partition of the training set, one part per rank, the same for every method; a rank "
                        "trains on its part only (the test set stays shared)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of --split's partition (not --seed's)")
    p.add_argument("--classes", default=None,
                   help="node-local image folders: the whole label set, comma-separated or a file (one name a "
                        "line), when a node lacks some classes (default: each node's folders, checked alike)")
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
                 "eval_samples", "recompute_bn"):
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
    if getattr(args, "eval_on", "all") == "main":
        if args.method != "ist":
            raise SystemExit(f"--eval-on main needs --method ist (the baselines hold the whole model), got --method "
                             f"{args.method}")
        if getattr(args, "init", "real") == "meta":
            raise SystemExit("--eval-on main puts the whole global model on one rank; with --init meta no rank may "
                             "hold it: use --eval-on all (streamed)")
        if args.recompute_bn:
            raise SystemExit("--recompute-bn needs every rank to run the global model on its own data: use it with "
                             "--eval-on all")
        if is_local_template(getattr(args, "data", None)):
            raise SystemExit("--eval-on main: node-local data ({rank}/{node} in --data) stays on its node, so every "
                             "rank scores its own evaluation set; use --eval-on all")
    if args.method != "ist" and getattr(args, "assignment", "random") != "random":
        raise SystemExit(f"--assignment {args.assignment} needs --method ist, got --method {args.method}")
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
    check_data_placement(args)
    if getattr(args, "data", None) is not None and not Path(args.data).exists():
        raise SystemExit(f"--data {args.data}: no such file or folder (give an ImageFolder root with train/ and "
                         "val/ or test/, a tarball of one, or, for ist_mlp.py, a folder of MNIST idx files)")
    check_output_dir(args.output_dir)


def check_data_placement(args: argparse.Namespace) -> None:
    """``--data`` with ``{rank}``/``{node}``/``{local_rank}``: this rank's path (kept as
    ``args.data``; the template as ``args.data_template``), an error naming the rank, the node
    and the placeholders when it is missing; a bad ``--split``; ``--classes`` read."""
    try:
        args.split = str(parse_split(getattr(args, "split", "iid")))
    except ValueError as error:
        raise SystemExit(str(error)) from None
    data = getattr(args, "data", None)
    args.data_template = None
    if is_local_template(data):
        if args.split != "iid":
            raise SystemExit(f"--split {args.split} partitions one shared data set; node-local --data {data} is "
                             "already split by where it lies")
        try:
            source = local_source(data)
            check_local_path(source)
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(str(error)) from None
        args.data_template, args.data = data, source.path
    classes = getattr(args, "classes", None)
    if isinstance(classes, str):
        path = Path(classes)
        names = path.read_text().split() if path.is_file() else classes.split(",")
        args.classes = [n.strip() for n in names if n.strip()]
        if len(set(args.classes)) != len(args.classes):
            raise SystemExit(f"--classes names a class twice: {classes}")


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
    """The run's :class:`ISTConfig` from the flags (a bad value: a one-line error)."""
    try:
        return ISTConfig(
            num_subnets=args.num_subnets, local_steps=args.local_steps, min_blocks=args.min_blocks,
            decomposition=args.decomposition, stages=args.stages, optimizer_state=args.optimizer_state,
            group_size=args.group_size, seed=args.seed, eval_scaling=not args.no_eval_scaling,
            wire_dtype=args.wire_dtype, wire_block=getattr(args, "wire_block", 64), sync_timeout=getattr(args, "sync_timeout", 600.0),
            outer_lr=args.outer_lr, outer_momentum=args.outer_momentum, outer_nesterov=args.outer_nesterov,
            assignment=getattr(args, "assignment", "random"),
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


def model_context(args: argparse.Namespace) -> Any:
    """Where a recipe builds its model: on the meta device under ``--init meta``."""
    return torch.device("meta") if getattr(args, "init", "real") == "meta" else contextlib.nullcontext()


__all__ = ["METHODS", "SCHEDULES", "add_training_args", "check_args", "check_output_dir", "data_errors", "ist_config",
           "model_context", "preflight"]
