"""The model :meth:`ISTAccelerator.prepare` hands back: this rank's subnet in training,
the global model (IST Alg. 1's averaged model, in its evaluation view) after ``.eval()``."""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .sharded import save_sharded

if TYPE_CHECKING:
    from .round import IST


class ISTModel(nn.Module):
    """What :meth:`ISTAccelerator.prepare` returns for the model.

    In training mode it is this rank's subnet (``.subnet``; DDP over the group when G > 1;
    during a data-parallel warm-up, the whole model under DDP over all ranks).
    ``.eval()`` gathers the global model in its evaluation view (all units, eval scaling)
    on every rank, so an unchanged evaluation loop scores the model IST trains; ``.train()``
    drops it again. Like any collective, call ``.eval()`` / ``.train()`` on every rank.
    """

    def __init__(self, ist: IST | None, trained: nn.Module) -> None:
        super().__init__()
        self.subnet = trained
        object.__setattr__(self, "ist", ist)  # not a submodule: parameters() are the subnet's
        object.__setattr__(self, "_global_view", None)
        object.__setattr__(self, "_global_stack", None)
        object.__setattr__(self, "_view_of", None)

    def attach(self, ist: IST, trained: nn.Module) -> None:
        """From now on train ``trained`` (this rank's subnet, maybe under DDP) for the round engine ``ist``."""
        self.subnet = trained
        object.__setattr__(self, "ist", ist)

    def _engine_state(self) -> tuple[int, int, int]:
        return (self.ist.round, self.ist.steps, self.ist.loads)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training or self._global_view is None:
            return self.subnet(*args, **kwargs)
        return self._global_view(*args, **kwargs)

    def train(self, mode: bool = True) -> ISTModel:
        super().train(mode)
        if mode:
            self.release_global()
            return self
        if self._global_stack is not None and self.ist is not None and self._view_of != self._engine_state():
            self.release_global()  # gathered before the engine moved on (a load, a step): not this model
        if self._global_stack is None and self.ist is not None:  # (warm-up: the model is whole)
            object.__setattr__(self, "_view_of", self._engine_state())
            object.__setattr__(self, "_eval_started", time.perf_counter())
            stack = contextlib.ExitStack()
            view = stack.enter_context(self.ist.eval_global(dst=None))
            view.eval()
            object.__setattr__(self, "_global_stack", stack)
            object.__setattr__(self, "_global_view", view)
        return self

    @property
    def global_view(self) -> nn.Module | None:
        """After ``.eval()``: the global model in its evaluation view that ``forward`` runs
        (None in training mode and during a warm-up)."""
        return self._global_view

    def release_global(self) -> None:
        """Drop the gathered global model (``.train()`` does this)."""
        if self._global_stack is not None:
            self._global_stack.close()
            object.__setattr__(self, "_global_stack", None)
            object.__setattr__(self, "_global_view", None)
            self.ist.exclude_from_compute(time.perf_counter() - self._eval_started)  # evaluation is not training

    # ---- what a user (or the Trainer) asks of the model it trained ----------------------

    #: methods of the global model that only read it (its weights may be on the meta device)
    FORWARDED_METHODS = frozenset({"num_parameters", "floating_point_ops", "estimate_tokens", "can_generate",
                                   "get_memory_footprint", "create_extended_attention_mask_for_decoder"})

    def __getattr__(self, name: str) -> Any:
        """``PreTrainedModel`` attributes (``config``, ``generation_config``, ``name_or_path``,
        ``_keys_to_ignore_on_save`` ...) and read-only methods (:attr:`FORWARDED_METHODS`) of
        the global model. A method that would act on weights is not forwarded: the global
        model's are not the trained values."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            ist = self.__dict__.get("ist")
            if ist is None or name.startswith("__"):
                raise
            value = getattr(ist.model_global, name)
            if callable(value) and not isinstance(value, nn.Module) and name not in self.FORWARDED_METHODS:
                raise AttributeError(f"ISTModel does not forward {name}() to the global model (it may act on "
                                     f"weights that are not the trained values): call it on the model before "
                                     "prepare(), or on accelerator.eval_global()'s model") from None
            return value

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``generate`` with the global model: after ``.eval()`` (a collective, every rank)."""
        if self._global_view is None:
            raise RuntimeError("ISTModel.generate needs the global model: call model.eval() on every rank first "
                               "(the Trainer's evaluate()/predict() do)")
        return self._global_view.generate(*args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *, export: bool = True,
                        is_main_process: bool | None = None, **ignored: Any) -> None:
        """The global model as ``save_pretrained`` writes it, ``config.json`` and
        ``generation_config.json`` included, but in ``safetensors`` shards written by the
        subnet groups' leaders with a Hugging Face index (never gathered on one rank).
        ``export``: fold the evaluation view into the weights (what ``from_pretrained``
        then scores is what ``.eval()`` scores); ``False`` keeps the raw training values.
        Every rank calls it."""
        if self.ist is None:
            raise RuntimeError("ISTModel.save_pretrained during the data-parallel warm-up: save the whole model "
                               "with accelerator.save_model")
        save_sharded(self.ist, save_directory, export=export)
        if is_main_process is None:
            is_main_process = self.ist.topology.rank == 0
        if is_main_process:
            for part in ("config", "generation_config"):  # what from_pretrained reads beside the weights
                if getattr(self.ist.model_global, part, None) is not None:
                    getattr(self.ist.model_global, part).save_pretrained(save_directory)

    # ---- the DeepSpeed engine's checkpoint protocol ----------------------------------------

    def decline_engine_checkpoint(self, folder: str, *args: Any, **kwargs: Any) -> bool:
        """Under DeepSpeed, Accelerate's ``save_state``/``load_state`` and the HF Trainer's
        checkpoint call ``save_checkpoint``/``load_checkpoint`` on the run's model, as on a
        DeepSpeed engine. A group's engine holds only its subnet, so nothing is written or
        read here: the global model (shards) and every rank's IST state (subnet, optimizer
        state, round) are written beside it by ISTAccelerator / ISTTrainer."""
        return True

    save_checkpoint = decline_engine_checkpoint  # the names Accelerate and the Trainer call
    load_checkpoint = decline_engine_checkpoint

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Gradient accumulation without the group's all-reduce (Accelerate calls this)."""
        if isinstance(self.subnet, DistributedDataParallel):
            return self.subnet.no_sync()
        return contextlib.nullcontext()



__all__ = ["ISTModel"]
