"""The IST form of a Hugging Face ``Trainer`` (IST Alg. 1; ResIST Alg. 1 around its loop).

:class:`ISTTrainerMixin` in front of ``Trainer``, ``Seq2SeqTrainer`` or a user's subclass
(:class:`ISTTrainer`, :class:`ISTSeq2SeqTrainer`, or :func:`ist_class` of any other) builds
the Trainer's accelerator as an :class:`~ist_accel.ISTAccelerator` (so
``accelerator.prepare`` hands the Trainer this rank's subnet and a subnet optimizer, and the
round runs inside ``optimizer.step()``), makes ``trainer.model`` the prepared
:class:`~ist_accel.ISTModel` (so ``evaluate()``/``predict()`` score the averaged global
model), saves the global model in shards, adds each rank's IST state to checkpoints
(``resume_from_checkpoint`` continues exactly; ``load_best_model_at_end`` takes up the best
one's), and adds the last round's metrics to every log (``report_to="wandb"`` records them).
A Trainer built without it becomes it through :func:`ist_accel.apply` (``ist_accel/trainer.py``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Seq2SeqTrainer, Trainer

from .accelerate import RANK_STATE, ISTAccelerator, ISTModel
from .schedulers import retarget_scheduler
from .config import ISTConfig
from .lifecycle import exit_with_parent
from .tracking import round_log

logger = logging.getLogger(__name__)


def prepare_arguments(ist_config: ISTConfig, training_args: Any) -> None:
    """What both routes (``ISTTrainer(...)`` and :func:`ist_accel.apply`) check, and set on
    the ``TrainingArguments``, before the Trainer's ``ISTAccelerator`` is built."""
    if not isinstance(ist_config, ISTConfig):
        raise TypeError(f"ist_config must be an ist_accel.ISTConfig, got {type(ist_config).__name__}")
    ist_config.check_world_size(int(os.environ.get("WORLD_SIZE", "1")))
    if training_args is not None and (getattr(training_args, "fsdp", None) or []):
        raise ValueError(f"IST with fsdp={training_args.fsdp!r}: FSDP shards every layer across all ranks and "
                         "communicates every step; IST keeps a subnet per group (DeepSpeed ZeRO may shard "
                         "inside a group: TrainingArguments(deepspeed=...))")
    exit_with_parent()  # a launched worker ends with its launcher
    if training_args is None:
        return
    # the process group made from these arguments gets ddp_timeout (under use_cpu torch's 30-minute gloo
    # default otherwise); ISTAccelerator puts sync_timeout on every group, this one included
    training_args.ddp_timeout = max(1, math.ceil(ist_config.sync_timeout))
    if getattr(training_args, "average_tokens_across_devices", False):
        # an all-reduce per step across every rank: IST's groups train apart between rounds
        training_args.average_tokens_across_devices = False
        logger.info("IST: average_tokens_across_devices set to False (no communication between rounds)")


def round_metrics(ist: Any) -> dict[str, float]:
    """The last round's measurements and the run's totals, for the Trainer's logs."""
    return round_log(ist.totals.history[-1], ist.totals, ist.subnet_numel())


class ISTTrainerMixin:
    """What makes a ``Trainer`` (or a subclass such as ``Seq2SeqTrainer``) train its model
    as independent subnets (see the module docstring).

    Args:
        ist_config: the IST settings; the world (processes) must be S x G.
        example_input: an input for tracing the model, when its structure is not found
            from its config (plain PyTorch models).
        *args, **kwargs: as for ``Trainer``.
    """

    ist_config: ISTConfig
    ist_example_input: torch.Tensor | None

    def __init__(self, *args: Any, ist_config: ISTConfig, example_input: torch.Tensor | None = None,
                 **kwargs: Any) -> None:
        prepare_arguments(ist_config, kwargs.get("args", args[1] if len(args) > 1 else None))
        self.ist_config, self.ist_example_input = ist_config, example_input
        super().__init__(*args, **kwargs)  # builds its accelerator once: an ISTAccelerator (below)

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's own accelerator set-up, with ISTAccelerator in place of Accelerator.
        ``Trainer`` names the class through its module's global ``Accelerator`` and builds
        the arguments itself; the global is swapped for this call only."""
        module = transformers.trainer
        original = module.Accelerator
        module.Accelerator = functools.partial(ISTAccelerator, self.ist_config, example_input=self.ist_example_input)
        try:
            super().create_accelerator_and_postprocess()  # type: ignore[misc]
        finally:
            module.Accelerator = original

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        # Called right after accelerator.prepare(model, optimizer): from here on the Trainer's
        # model is the prepared IST model (the subnet in training, the global model in eval).
        ist = self.accelerator.ist
        if self.accelerator.ist_model is not None and self.model is not self.accelerator.ist_model:
            self.model = self.accelerator.ist_model
        if ist is not None and self.lr_scheduler is not None and self.lr_scheduler.optimizer is not ist.optimizer:
            # under DeepSpeed the scheduler was built on the global optimizer before prepare()
            retarget_scheduler(self.lr_scheduler, ist.optimizer)
        return super().create_scheduler(num_training_steps, optimizer)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, after checking that checkpoints fall on round ends. Under
        DeepSpeed the Trainer resumes by loading the engine's own checkpoint
        (``transformers.trainer.deepspeed_load_checkpoint``, which refuses a folder without
        one); a group's engine holds one subnet, so IST's per-rank state (restored in
        ``_load_optimizer_and_scheduler``) takes its place, for this call only."""
        k = self.ist_config.local_steps
        if self.args.save_strategy == "steps" and self.args.save_steps and int(self.args.save_steps) % k:
            raise ValueError(f"save_steps={self.args.save_steps} must be a multiple of ist_config.local_steps={k}: "
                             "IST checkpoints are taken at round ends")
        with self._engine_checkpoint_skipped() if self.is_deepspeed_enabled else contextlib.nullcontext():
            output = super().train(*args, **kwargs)  # type: ignore[misc]
        if self.accelerator.ist is not None:
            self.accelerator.ist.finish()  # training ended mid-round: those steps reach the global model
        return output

    @contextlib.contextmanager
    def _engine_checkpoint_skipped(self):
        module = transformers.trainer
        original = module.deepspeed_load_checkpoint

        def load(engine: Any, checkpoint: str, **kw: Any) -> Any:
            return None if isinstance(engine, ISTModel) else original(engine, checkpoint, **kw)

        module.deepspeed_load_checkpoint = load
        try:
            yield
        finally:
            module.deepspeed_load_checkpoint = original

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with the last round's IST metrics (so every reporter gets them)."""
        ist = self.accelerator.ist
        if ist is not None and ist.totals.history:
            logs = {**logs, **round_metrics(ist)}
        super().log(logs, *args, **kwargs)

    @property
    def ist(self):
        """The round engine (after training started), or None."""
        return self.accelerator.ist

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The global model as ``save_pretrained`` would write it, but in shards written by
        the subnet groups' leaders (every rank calls it; no rank holds the whole model), with
        the evaluation view folded into its weights: ``from_pretrained`` of the
        folder scores what ``evaluate()`` scores (``push_to_hub`` too). Inside a Trainer
        checkpoint the raw training values are written, as ``save_state`` does, so resuming
        from it stays exact."""
        if not isinstance(self.model, ISTModel):
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        # a collective: each group's leader writes its shard (Hugging Face layout, an index beside)
        self.model.save_pretrained(output_dir, export=not getattr(self, "_saving_checkpoint", False),
                                   is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    # Trainer's checkpoint steps have no public seam: on_save fires after the checkpoint was
    # written, pushed and rotated (and not at all for enable_jit_checkpoint's), and no event
    # carries the checkpoint folder or replaces the Trainer's own loads.

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self._saving_checkpoint = True  # the checkpoint's model keeps the raw training values
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self._saving_checkpoint = False

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]
        if self.accelerator.ist is not None:  # each rank's subnet, optimizer state, owner shards, round
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            path = Path(output_dir) / RANK_STATE.format(rank=self.accelerator.process_index)
            torch.save(self.accelerator.ist.state_dict(), path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        if checkpoint is not None and self.accelerator.ist is not None:
            k = self.ist_config.local_steps
            if self.state.global_step % k:
                raise ValueError(f"resuming at step {self.state.global_step}, not a round end (local_steps={k})")
            self._load_rank_state(checkpoint)

    def _load_rank_state(self, checkpoint: str) -> None:
        path = Path(checkpoint) / RANK_STATE.format(rank=self.accelerator.process_index)
        if not path.is_file():
            raise FileNotFoundError(f"{checkpoint} has no {path.name}: not an ISTTrainer checkpoint of this world size")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.accelerator.check_rank_state(state, path)  # another model's shapes: named, before loading
        self.accelerator.ist.load_state_dict(state)
        if isinstance(self.model, ISTModel):
            self.model.release_global()  # a global view gathered before the load is not this model
        logger.info("ISTTrainer: resumed round %d (step %d)", self.accelerator.ist.round, self.accelerator.ist.steps)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: every rank takes up its IST state (subnet, owner
        shards, round) from the best checkpoint, so the global model is the one that scored
        best (and ``save_model`` after it writes that one)."""
        if not isinstance(self.model, ISTModel) or self.accelerator.ist is None:
            return super()._load_best_model()  # type: ignore[misc]
        logger.info("IST: loading the best model from %s (score %s)", self.state.best_model_checkpoint,
                    self.state.best_metric)
        self._load_rank_state(self.state.best_model_checkpoint)

    @contextlib.contextmanager
    def global_model(self):
        """The gathered global model in its evaluation view (a collective: every rank)."""
        with self.accelerator.eval_global() as model:
            yield model


class ISTTrainer(ISTTrainerMixin, Trainer):
    """``Trainer`` with IST (see :class:`ISTTrainerMixin`)."""


class ISTSeq2SeqTrainer(ISTTrainerMixin, Seq2SeqTrainer):
    """``Seq2SeqTrainer`` with IST (see :class:`ISTTrainerMixin`)."""


_IST_CLASSES: dict[type, type] = {Trainer: ISTTrainer, Seq2SeqTrainer: ISTSeq2SeqTrainer}


def ist_class(cls: type) -> type:
    """``cls`` (a ``Trainer`` subclass) with IST: ``ISTTrainerMixin`` in front of it, made
    once per class (``ISTTrainer`` for ``Trainer``, ``ISTSeq2SeqTrainer`` for ``Seq2SeqTrainer``)."""
    if issubclass(cls, ISTTrainerMixin):
        return cls
    if cls not in _IST_CLASSES:
        _IST_CLASSES[cls] = type(f"IST{cls.__name__}", (ISTTrainerMixin, cls),
                                 {"__module__": cls.__module__, "__doc__": cls.__doc__})
    return _IST_CLASSES[cls]


__all__ = ["ISTSeq2SeqTrainer", "ISTTrainer", "ISTTrainerMixin", "ist_class", "prepare_arguments", "round_metrics"]
