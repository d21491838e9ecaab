"""``save_state`` / ``load_state`` of an :class:`~ist_accel.accelerate.ISTAccelerator`:
Accelerate's own checkpoint (schedulers, samplers, RNG states, grad scaler, registered
objects) plus the global model in shards written by the subnet groups' leaders
(:mod:`ist_accel.sharded`) and, per rank, ``ist_rank<r>.pt`` (round, step, subnet,
optimizer state, owner shards), which resume the run exactly.

Atomic (:mod:`ist_accel.checkpoint`): written into ``<dir>.partial``, then ``MANIFEST.json``,
then renamed; every rank agrees on the outcome. The per-rank subnet stays out of
Accelerate's files through its public seams: a save pre-hook drops the IST model's
weights, a load pre-hook leaves the IST model to this module. Accelerate's hooks see
models only, so the subnet's optimizer (its state is in the rank file) is left out of
Accelerate's optimizer files by excluding it from ``Accelerator._optimizers`` for the call."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import checkpoint
from .faults import inject
from .ist_model import ISTModel
from .sharded import collect_shards

if TYPE_CHECKING:
    from .accelerate import ISTAccelerator

logger = logging.getLogger(__name__)

RANK_STATE = "ist_rank{rank}.pt"


class AtomicState:
    """Writes and reads an ISTAccelerator's checkpoints (module docstring)."""

    def __init__(self, accelerator: ISTAccelerator) -> None:
        self.accelerator = accelerator
        self.writing_shards = False  # inside a save that writes the global model as shards
        accelerator.register_save_state_pre_hook(self._leave_out_ist_weights)
        accelerator.register_load_state_pre_hook(self._leave_out_ist_model)

    # ---- Accelerate's hooks ----------------------------------------------------------------

    def _leave_out_ist_weights(self, models: list[Any], weights: list[dict], output_dir: str) -> None:
        """The global model is written as shards: no weights file of it from Accelerate."""
        if self.writing_shards and len(weights) == len(models):
            for i in reversed(range(len(models))):
                if isinstance(models[i], ISTModel):
                    del weights[i]

    def _leave_out_ist_model(self, models: list[Any], input_dir: str) -> None:
        """The IST model is loaded from the rank files (or, in the warm-up, with a shape check)."""
        models[:] = [m for m in models if not isinstance(m, ISTModel)]

    @contextlib.contextmanager
    def _without_subnet_optimizer(self) -> Iterator[None]:
        a = self.accelerator
        kept = list(a._optimizers)
        if a.ist is not None:
            a._optimizers[:] = [o for o in kept if o.optimizer is not a.ist.optimizer]
        try:
            yield
        finally:
            a._optimizers[:] = kept

    # ---- save --------------------------------------------------------------------------

    def save(self, output_dir: str | None, accelerate_save: Callable[[str], Any]) -> str:
        """Write the checkpoint (``output_dir``, or ``checkpoints/step_<n>`` under the
        project folder with automatic naming); ``accelerate_save(folder)`` is Accelerate's
        own ``save_state``. Every rank calls it; returns the folder."""
        a = self.accelerator
        config = a.project_configuration
        final = Path(output_dir) if output_dir is not None else self._next_automatic()
        partial = checkpoint.partial_path(final)
        failure: Exception | None = None
        if a.is_main_process:
            try:
                if partial.exists():
                    shutil.rmtree(partial)  # left by an earlier crash
                partial.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                failure = error
        checkpoint.raise_unless_all_saved(failure, final, partial)  # (a barrier)
        # Every collective first (the global model, under ZeRO-3 the subnet), then only writes: a
        # rank that fails to write (a full disk) cannot leave the others waiting in a collective.
        ist = a.ist
        if ist is None:  # inside the data-parallel warm-up
            step, info, rank_state = a.warmup.steps_done, {"phase": "warmup"}, None
        else:
            step, info = ist.steps, {"phase": "ist", "round": ist.round}
            rank_state = ist.state_dict()
        # the global model, raw (the resume is exact), in shards its groups' leaders write
        shards = collect_shards(ist, export=False) if ist is not None else None
        automatic = config.automatic_checkpoint_naming
        config.automatic_checkpoint_naming = False  # the folder is ours to name
        self.writing_shards = shards is not None
        try:
            with self._without_subnet_optimizer():
                accelerate_save(str(partial))
            if shards is not None:
                shards.write(partial)
            if rank_state is None:
                a.warmup.save(partial, a.is_main_process)
            else:
                torch.save(rank_state, partial / RANK_STATE.format(rank=a.process_index))
            inject("save", a.process_index, step)
        except Exception as error:  # OSError, or torch.save's / safetensors' own error on a full disk
            failure = error
        finally:
            config.automatic_checkpoint_naming = automatic
            self.writing_shards = False
        checkpoint.raise_unless_all_saved(failure, final, partial)
        if a.is_main_process:
            try:
                checkpoint.write_manifest(partial, {**info, "step": step, "world_size": a.num_processes})
                checkpoint.publish(partial, final)
                if automatic:
                    checkpoint.prune_checkpoints(self._run_dir(), config.total_limit)
            except OSError as error:
                failure = error
        checkpoint.raise_unless_all_saved(failure, final, partial)
        logger.info("IST: saved %s (step %d) to %s", info["phase"], step, final)
        return str(final)

    def _run_dir(self) -> Path:
        return Path(self.accelerator.project_dir or ".")

    def _next_automatic(self) -> Path:
        a = self.accelerator
        if not a.project_configuration.automatic_checkpoint_naming:
            raise ValueError("save_state needs output_dir (or ProjectConfiguration(automatic_checkpoint_naming=True))")
        return checkpoint.checkpoint_path(self._run_dir(), a.optimizer_steps)

    # ---- load --------------------------------------------------------------------------

    def load(self, input_dir: str | None, accelerate_load: Callable[[str], None]) -> None:
        """Resume from :meth:`save` (``input_dir``, or the latest complete checkpoint under
        the project folder); ``accelerate_load(folder)`` is Accelerate's own ``load_state``.
        The same world size is required; a checkpoint of another model is refused, naming
        the tensor and both shapes, before anything is loaded."""
        a = self.accelerator
        folder = Path(input_dir) if input_dir is not None else self._latest()
        manifest = checkpoint.verify(folder)  # before anything is loaded
        if manifest.get("world_size") != a.num_processes:
            raise checkpoint.CheckpointError(f"{folder} was written by {manifest.get('world_size')} processes, "
                                             f"this run has {a.num_processes}")
        path = folder / RANK_STATE.format(rank=a.process_index)
        if a.warmup is not None and a.warmup.warming:
            if not path.is_file():  # a checkpoint from inside the warm-up
                a.warmup.load_model(folder)
                accelerate_load(str(folder))
                a.warmup.load_progress(folder)
                return
            a.warmup.switch()
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {path.name}: not an ISTAccelerator checkpoint, or one "
                                    "written by a different number of processes")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.check_rank_state(state, path)
        a.ist.load_state_dict(state)
        with self._without_subnet_optimizer():
            accelerate_load(str(folder))
        logger.info("IST: resumed at round %d (step %d) from %s", a.ist.round, a.ist.steps, folder)

    def _latest(self) -> Path:
        found = checkpoint.complete_checkpoints(self._run_dir())
        if not found:
            raise FileNotFoundError(f"no complete checkpoint folder in {checkpoint.checkpoint_root(self._run_dir())}; "
                                    "pass input_dir")
        return found[-1]

    def check_rank_state(self, state: Any, path: Path) -> None:
        """Refuse (on every rank alike) a rank state whose subnet or owner-shard tensors have
        other shapes than this run's, naming the tensor and both shapes, before anything is
        loaded (a checkpoint of another ``--hidden`` width, say)."""
        problem = self.accelerator.ist.shape_mismatch(state) if isinstance(state, dict) else None
        checkpoint.raise_unless_all_fit(problem, path)


__all__ = ["RANK_STATE", "AtomicState"]
