"""What the recipes (``recipes/*.py``) share: one ordinary Accelerate loop that runs
``--method ist`` (ISTAccelerator), ``ddp`` (Accelerator), ``localsgd`` (Accelerate's
``LocalSGD``) or ``diloco`` (torchft's) with the same data, model, seeds and step budget,
and writes ``results.json``. A recipe parses its own defaults and builds data and model;
this package does the rest: :mod:`.arguments` (flags and their checks), :mod:`.run` (set-up
and results), :mod:`.loop` (the loop), :mod:`.report` (bytes, memory, accuracy curve),
:mod:`.checkpoints` (save and resume), :mod:`.datasets` (evaluation subsets) and
:mod:`.process` (logging, failures, exit)."""

from .arguments import (METHODS, add_training_args, check_args, check_output_dir, data_errors, ist_config,
                        model_context, preflight)
from .datasets import evenly_spaced, held_out_split
from .loop import Progress, evaluate, lr_lambda
from .process import finish, setup_logging
from .run import make_accelerator, train_classifier

__all__ = ["METHODS", "Progress", "add_training_args", "check_args", "check_output_dir", "data_errors", "evaluate",
           "evenly_spaced", "finish", "held_out_split", "ist_config", "lr_lambda", "make_accelerator", "model_context",
           "preflight", "setup_logging", "train_classifier"]
