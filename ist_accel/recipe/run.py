"""A recipe's run from its parsed arguments, data and model: the accelerator for the
method, the optimizer and schedule, ``prepare``, resume, the loop (:mod:`.loop`), the
final model and ``OUTPUT_DIR/results.json``. Every rank stops with the message of the rank
whose failure started it (:mod:`.process`)."""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.local_sgd import LocalSGD
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..accelerate import ISTAccelerator
from ..init import is_meta, materialize
from ..memory import dataset_tensors
from ..wiretap import Wiretap
from .arguments import ist_config, preflight
from .checkpoints import resume
from .datasets import EpochSeeded, augments, evenly_spaced, held_out_split, norm_batches
from ..node_local import prepare_local_loader
from .local_data import LocalEval, agreed_batches, data_per_rank, local_data
from .loop import MainProcessEval, NoPeriodicSync, Progress, Run, lr_lambda, train_loop
from .process import reported_failure
from .report import communication_report, count_exchanges, in_phase

logger = logging.getLogger(__name__)


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
        return _with_wiretap(args, accelerator, model, train_set, eval_set)
    except Exception as error:
        reported = reported_failure(error)
        if reported is error:
            raise
        raise reported from error


def _with_wiretap(args: argparse.Namespace, accelerator: Accelerator, model: nn.Module, train_set: Dataset,
                  eval_set: Dataset) -> dict[str, Any] | None:
    tap = Wiretap().install()  # every byte this rank moves, by phase (setup, train, exchange, eval, save)
    try:
        return _run(args, accelerator, model, train_set, eval_set, tap)
    finally:
        tap.uninstall()


def _run(args: argparse.Namespace, accelerator: Accelerator, model: nn.Module, train_set: Dataset, eval_set: Dataset,
         tap: Wiretap) -> dict[str, Any] | None:
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
    local = local_data(args, accelerator, train_set, eval_set)  # None: one set, sharded over all ranks (today's)
    if local is not None:
        train_set, eval_set = local.train_set, local.eval_set
    # augmentation drawn per item from (seed, epoch, item), and the loader's own generator for each epoch's base
    # seed: both apart from the global RNG a checkpoint saves, so a resumed run draws what the first run drew
    loaded = EpochSeeded(train_set, args.seed) if augments(train_set) else train_set
    train_loader = DataLoader(loaded, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              num_workers=args.num_workers, generator=torch.Generator().manual_seed(args.seed))
    eval_loader = DataLoader(eval_set, batch_size=args.eval_batch_size, num_workers=args.num_workers)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, momentum=args.momentum)
    batches_per_epoch = own_batches = len(train_loader) // accelerator.num_processes
    if local is not None:  # this rank's own set, not sharded again; the step budget agreed over ranks
        train_loader = prepare_local_loader(accelerator, train_loader)
        own_batches = len(train_loader)
        batches_per_epoch = agreed_batches(accelerator, own_batches, accelerator.process_index)
    total_steps = args.max_steps or max(1, int(args.epochs * batches_per_epoch) // args.grad_accum)
    if args.dense_warmup_epochs:  # whole rounds, so round ends stay on multiples of --local-steps
        warm = math.ceil(args.dense_warmup_epochs * batches_per_epoch / args.grad_accum / args.local_steps)
        accelerator.dense_warmup_steps = warm * args.local_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.schedule, total_steps, args.lr_warmup_steps, args.milestones))
    model_params = sum(p.numel() for p in model.parameters())
    if local is None:
        model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, eval_loader, scheduler)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        eval_loader = (LocalEval(accelerator, eval_set, args.eval_batch_size) if local.eval_local
                       else accelerator.prepare(eval_loader))
    if getattr(args, "eval_on", "all") == "main":  # IST: the global model on the main process alone
        eval_loader = MainProcessEval(eval_set, args.eval_batch_size, eval_loader)
    count_exchanges(tap, accelerator, model)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    accelerator.register_for_checkpointing(tap)  # a resumed run goes on counting
    if args.resume:
        resume(accelerator, args)
    if accelerator.log_with:
        accelerator.init_trackers(args.project, config=vars(args),
                                  init_kwargs={"wandb": {"name": args.run_name, "dir": str(output)}})
    local_sgd = (LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=args.local_steps)
                 if args.method == "localsgd" else NoPeriodicSync())  # LocalSGD refuses DeepSpeed even when off
    if args.method == "diloco":  # torchft's, its outer step from --outer-* (DiLoCo's 0.7 / 0.9 / Nesterov if unset)
        from ..baselines import TorchftDiLoCo

        plain = args.outer_lr == 1.0 and not args.outer_momentum
        local_sgd = TorchftDiLoCo(accelerator, model, optimizer, args.local_steps,
                                  0.7 if plain else args.outer_lr, 0.9 if plain else args.outer_momentum,
                                  True if plain else args.outer_nesterov, timeout=args.sync_timeout)
    if args.method == "localsgd":  # its syncs (and the one more at __exit__) are its exchange
        local_sgd._sync_and_avg_model_params = in_phase(tap, "exchange", local_sgd._sync_and_avg_model_params)
    with tap.phase("train"):
        results = train_loop(args, Run(accelerator, model, optimizer, scheduler, train_loader, eval_loader, progress,
                                       total_steps, own_batches, local_sgd, tap,
                                       dataset_tensors(train_set, eval_set),
                                       norm_batches(train_set, args.recompute_bn, args.batch_size,
                                                    accelerator.process_index, accelerator.num_processes, args.seed,
                                                    accelerator.device, own=local is not None)))
    if results is None:
        return None
    with tap.phase("save"):
        accelerator.save_model(model, output / "model")
    with tap.phase("report"):
        results.update(communication_report(args, accelerator, model_params, progress.step, tap))
    results["model_params"] = model_params
    results["evaluated_on"] = {"split": "held-out train" if getattr(args, "val_split", 0.0) else "test",
                               "items": len(eval_set)}
    results["split"] = getattr(args, "split", "iid") if local is None else local.split
    results["recompute_bn"] = args.recompute_bn  # batches per rank the scored statistics came from (0: as trained)
    if local is not None:
        results["data_per_rank"] = data_per_rank(accelerator, local)
        results["epochs_per_rank"] = [r["train_items"] and progress.batches_seen * args.batch_size / r["train_items"]
                                      for r in results["data_per_rank"]]
        if local.eval_local:
            results["evaluated_on"] = {"split": "node-local " + results["evaluated_on"]["split"],
                                       "items": eval_loader.items}
    if accelerator.is_main_process:
        (output / "results.json").write_text(json.dumps(results, indent=2))
        logger.info("results: %s", json.dumps(results))
    accelerator.end_training()
    return results


__all__ = ["make_accelerator", "train_classifier"]
