"""IST on a Hugging Face ``Trainer`` you have: :func:`apply`, and :class:`ISTCallback`, its
one-line form inside ``Trainer(...)`` (IST Alg. 1; ResIST Alg. 1 around the Trainer's loop).

Explicit, on a built Trainer, before ``train()``::

    trainer = Trainer(model=model, args=TrainingArguments(..., use_cpu=True), train_dataset=train, eval_dataset=test)
    ist_accel.apply(trainer, ISTConfig(num_subnets=2, local_steps=10))
    trainer.train(); trainer.evaluate()

or the same in the Trainer's construction::

    trainer = Trainer(..., callbacks=[ISTCallback(ISTConfig(num_subnets=2, local_steps=10))])

Either makes that Trainer, in place, the IST form of its class (:func:`ist_class`:
``ISTTrainerMixin`` in front of it, as ``fully_shard`` does for a module; what it changes is
in ``ist_accel/trainer_mixin.py``) and rebuilds its accelerator as an ``ISTAccelerator``
before the optimizer and scheduler exist. ``ISTTrainer(..., ist_config=...)`` is the same
class built directly (its accelerator is built once).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import CallbackHandler

from .config import ISTConfig
from .trainer_mixin import ISTSeq2SeqTrainer, ISTTrainer, ISTTrainerMixin, ist_class, prepare_arguments, round_metrics

logger = logging.getLogger(__name__)

_EXPLICIT = "call ist_accel.apply(trainer, ist_config) on the built Trainer before train()"


def apply(trainer: Trainer, config: ISTConfig, *, example_input: torch.Tensor | None = None) -> Trainer:
    """Make ``trainer`` (built, not trained yet) train with IST, in place, and return it.

    Its class becomes :func:`ist_class` of its class (``Trainer`` -> ``ISTTrainer``, a
    subclass ``X`` -> ``ISTX``) and its accelerator is rebuilt as an ``ISTAccelerator``
    through the Trainer's public ``create_accelerator_and_postprocess``, so the optimizer and
    scheduler ``train()`` builds are this rank's subnet's. Under DeepSpeed, Accelerate keeps
    one state per process, made by the Trainer's first accelerator: it is reset so the
    ``ISTAccelerator`` makes its own.

    Args:
        trainer: a ``Trainer``, ``Seq2SeqTrainer`` or subclass, after ``Trainer(...)`` and
            before ``train()``.
        config: the IST settings; the world (processes) must be S x G.
        example_input: an input for tracing the model, when its structure is not found
            from its config (plain PyTorch models).

    Applying the same config to a Trainer that has it already does nothing.
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"ist_accel.apply takes a transformers.Trainer, got {type(trainer).__name__}")
    callbacks = [c for c in trainer.callback_handler.callbacks if isinstance(c, ISTCallback)]
    if any(c.ist_config is not config for c in callbacks):
        raise ValueError("the Trainer has an ISTCallback with another ISTConfig: give one of them")
    if isinstance(trainer, ISTTrainerMixin):
        if trainer.ist_config is not config:
            raise ValueError("this Trainer trains IST with another ISTConfig already (ISTTrainer(ist_config=...), "
                             "ISTCallback or ist_accel.apply): give one of them")
    else:
        if trainer.is_in_train or trainer.state.global_step:
            raise RuntimeError("ist_accel.apply after training started: its optimizer is the whole model's; "
                               "apply IST to the Trainer before train()")
        prepare_arguments(config, trainer.args)
        trainer.__class__ = ist_class(type(trainer))
        trainer.ist_config, trainer.ist_example_input = config, example_input
        if trainer.is_deepspeed_enabled:
            from accelerate.state import AcceleratorState

            # Accelerate's process-wide state, made by the Trainer's plain accelerator, refuses changes
            AcceleratorState._reset_state()  # (on CPU it even left DeepSpeed out); no public reset
        trainer.create_accelerator_and_postprocess()  # now an ISTAccelerator
        logger.info("IST applied to %s: %s", type(trainer).__name__, config)
    for callback in callbacks:
        callback.trainer = trainer  # the Trainer it applied IST to (its on_train_begin checks)
    return trainer


class ISTCallback(TrainerCallback):
    """IST in the Trainer's construction, in one line::

        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                          callbacks=[ISTCallback(ISTConfig(num_subnets=2, local_steps=10))])

    At ``on_init_end``, which ``Trainer.__init__`` fires once it is built, the callback calls
    ``apply(trainer, ist_config)`` on that Trainer: the ``self`` of the ``Trainer.__init__``
    frame that fired the event (``Trainer``, ``Seq2SeqTrainer`` or a subclass). Transformers
    hands callbacks no reference to their Trainer; the callback takes it from that one frame
    and refuses anything else. Added later with ``trainer.add_callback`` (after the Trainer
    built a plain accelerator) it refuses to train rather than let DDP train silently:
    call :func:`ist_accel.apply` instead.
    """

    def __init__(self, ist_config: ISTConfig, example_input: torch.Tensor | None = None) -> None:
        if not isinstance(ist_config, ISTConfig):
            raise TypeError(f"ist_config must be an ist_accel.ISTConfig, got {type(ist_config).__name__}")
        self.ist_config = ist_config
        self.example_input = example_input
        self.trainer: Trainer | None = None  # set by apply()

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self._trainer_being_built()
        if trainer is None:
            raise RuntimeError("ISTCallback.on_init_end was not fired by Trainer.__init__: pass the callback as "
                               f"Trainer(..., callbacks=[ISTCallback(ist_config)]), or {_EXPLICIT}")
        apply(trainer, self.ist_config, example_input=self.example_input)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:
            raise RuntimeError("ISTCallback was added after the Trainer was built (trainer.add_callback): its "
                               "optimizer and accelerator are not IST's and it would train plain data-parallel. "
                               f"Pass it as Trainer(..., callbacks=[ISTCallback(ist_config)]), or {_EXPLICIT}")

    def _trainer_being_built(self) -> Trainer | None:
        """The ``self`` of the ``Trainer.__init__`` frame that fired this ``on_init_end``
        (through transformers' ``CallbackHandler``), or None when another frame called it."""
        passing = {CallbackHandler.on_init_end.__code__, CallbackHandler.call_event.__code__}
        init = inspect.unwrap(Trainer.__init__).__code__
        frame = inspect.currentframe()
        try:
            frame = frame.f_back if frame is not None else None
            while frame is not None and (frame.f_locals.get("self") is self or frame.f_code in passing):
                frame = frame.f_back  # this callback's own methods, then the handler dispatching the event
            candidate = frame.f_locals.get("self") if frame is not None and frame.f_code is init else None
            return candidate if isinstance(candidate, Trainer) else None
        finally:
            del frame


__all__ = ["ISTCallback", "ISTSeq2SeqTrainer", "ISTTrainer", "ISTTrainerMixin", "apply", "ist_class", "round_metrics"]
