"""The dense warm-up before IST (ResIST's ImageNet setting, arXiv 2107.00961 Sec. 4): the
whole model trains data-parallel (DDP over all ranks, the user's own optimizer) for a
number of optimizer steps, then the same prepared objects train subnets.

:class:`DenseWarmup` is a two-state machine: *warming* (an optimizer hook counts steps)
and *switched* (the hook is gone, the accelerated optimizer steps the subnet's optimizer,
schedulers follow it). A checkpoint taken while warming holds the whole model (written
by Accelerate) and ``ist_warmup.json`` (steps done)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from . import checkpoint
from .init import is_meta
from .ist_model import ISTModel
from .launch import wrap_in_ddp

logger = logging.getLogger(__name__)

WARMUP_STATE = "ist_warmup.json"


class DenseWarmup:
    """Counts the warm-up's optimizer steps and switches to IST after ``steps`` of them.

    ``start_ist(model, user_optimizer, schedulers)`` builds the round engine and returns
    the subnet's optimizer; ``accelerated`` (the optimizer the loop holds) then steps it."""

    def __init__(self, steps: int, model: nn.Module, user_optimizer: torch.optim.Optimizer, accelerated: Any,
                 schedulers: list[Any], start_ist: Callable[..., torch.optim.Optimizer]) -> None:
        self.steps, self.steps_done = steps, 0
        self.model, self.user_optimizer, self.accelerated = model, user_optimizer, accelerated
        self.schedulers, self.start_ist = schedulers, start_ist
        self.warming = True
        self.hook = user_optimizer.register_step_post_hook(self._count_step)

    @classmethod
    def prepare(cls, accelerator: Accelerator, steps: int, model: nn.Module, user_optimizer: torch.optim.Optimizer,
                schedulers: list[Any], start_ist: Callable[..., torch.optim.Optimizer]
                ) -> tuple[DenseWarmup, ISTModel, Any]:
        """Whole model, DDP over all ranks, the user's own optimizer, until the switch:
        (the warm-up, the prepared model, the prepared optimizer)."""
        if is_meta(model):
            raise ValueError("dense_warmup_steps trains the whole model on every rank: build it on a real device, "
                             "not on meta (or warm up without IST first)")
        model.to(accelerator.device)
        trained = wrap_in_ddp(model, accelerator) if accelerator.num_processes > 1 else model
        ist_model = accelerator.prepare_model(ISTModel(None, trained), evaluation_mode=True)
        optimizer = accelerator.prepare_optimizer(user_optimizer)
        logger.info("IST: %d data-parallel warm-up steps before IST", steps)
        return cls(steps, model, user_optimizer, optimizer, schedulers, start_ist), ist_model, optimizer

    def _count_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps_done += 1
        if self.steps_done >= self.steps:
            self.switch()

    def switch(self) -> None:
        """End the warm-up: the same prepared objects now train subnets."""
        if not self.warming:
            return
        self.hook.remove()
        self.warming = False
        subnet_optimizer = self.start_ist(self.model, self.user_optimizer, self.schedulers)
        self.user_optimizer.state.clear()  # the whole model's momentum is not carried into subnets
        self.accelerated.optimizer = subnet_optimizer
        logger.info("IST: warm-up done after %d steps, switched to subnets", self.steps_done)

    # ---- a checkpoint taken while warming ----------------------------------------------

    def save(self, folder: Path, is_main_process: bool) -> None:
        """Beside Accelerate's files (the whole model among them): the steps done."""
        if is_main_process:
            (folder / WARMUP_STATE).write_text(json.dumps({"warmup_steps_done": self.steps_done}))

    def load_model(self, folder: Path) -> None:
        """The whole model from Accelerate's weights file, refused on every rank alike when
        a tensor's shape differs from this run's (named, before anything is loaded)."""
        from safetensors.torch import load_file

        weights = folder / "model.safetensors"
        state = load_file(weights) if weights.is_file() else torch.load(
            folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        live = {n: tuple(t.shape) for n, t in self.model.state_dict().items()}
        checkpoint.raise_unless_all_fit(checkpoint.shape_mismatch(state, live, "model"), weights)
        self.model.load_state_dict(state)

    def load_progress(self, folder: Path) -> None:
        self.steps_done = json.loads((folder / WARMUP_STATE).read_text())["warmup_steps_done"]


__all__ = ["WARMUP_STATE", "DenseWarmup"]
