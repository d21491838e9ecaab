"""Where the global model's initial values come from, one piece at a time.

The engine never needs the whole global model: a rank materializes its subnet and its
owner shard (IST: "storing only a portion of network parameters on each device"). It asks
an :class:`InitialValues` source for exactly those pieces:

* :class:`ModelValues`: a real model (on every rank; the set-up check confirms all ranks
  hold the same values, else rank 0's are sent);
* :class:`MetaInit`: a model built on the ``meta`` device (``torch.device("meta")``,
  Accelerate's ``init_empty_weights()``, a transformers ``from_config`` under it): every
  module that owns tensors is initialized on its own, by its own ``reset_parameters()``
  (or a transformers model's ``_init_weights``), under a generator seeded by (seed, module
  path). The values are the same whichever rank materializes a unit, and at most one
  module exists in full at a time;
* :class:`SafetensorsValues`: a ``safetensors`` file or a Hugging Face shard index
  (``model.safetensors.index.json``): only the rows a piece needs are read.
"""

from __future__ import annotations

import copy
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .tensors import Piece, state_tensors


def is_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is on the meta device."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


class InitialValues(ABC):
    """Values of the global model's tensors, read by piece."""

    @abstractmethod
    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (a transient copy or view: the caller keeps a slice)."""

    def piece(self, piece: Piece) -> torch.Tensor:
        """The values of ``piece`` (a copy)."""
        return piece.gather(self.tensor(piece.global_name))

    def rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows ``[lo, hi)`` of tensor ``name`` (a copy)."""
        return self.tensor(name)[lo:hi].clone()

    def digest(self, names: list[str]) -> int:
        """A checksum of the values (ranks compare it at set-up); 0 when every rank derives
        the values itself, identically."""
        return 0


class ModelValues(InitialValues):
    """A real model's own tensors."""

    def __init__(self, model: nn.Module) -> None:
        self.tensors = state_tensors(model)

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name].detach()

    def digest(self, names: list[str]) -> int:
        sums = [self.tensors[n].detach().double().sum() for n in names]
        squares = [self.tensors[n].detach().double().square().sum() for n in names]
        blob = repr([round(float(v), 6) for v in (*sums, *squares)]).encode()
        return int(hashlib.sha256(blob).hexdigest()[:12], 16)


class MetaInit(InitialValues):
    """Deterministic per-module initialization of a model built on the meta device."""

    def __init__(self, model: nn.Module, seed: int) -> None:
        self.model, self.seed = model, seed
        self.owners = _tensor_owners(model)
        self._held: tuple[str, dict[str, torch.Tensor]] | None = None  # the last module materialized

    def tensor(self, name: str) -> torch.Tensor:
        path = self.owners[name]
        if self._held is None or self._held[0] != path:
            self._held = (path, materialize_module(self.model, path, self.seed))
        return self._held[1][name]

    def release(self) -> None:
        self._held = None


class SafetensorsValues(InitialValues):
    """A safetensors file, or a folder / index JSON of shards in the Hugging Face layout."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            path = index if index.is_file() else path / "model.safetensors"
        if path.suffix == ".json":
            weight_map = json.loads(path.read_text())["weight_map"]
            files = {name: path.parent / file for name, file in weight_map.items()}
        else:
            with safe_open(str(path), framework="pt") as f:
                files = dict.fromkeys(f.keys(), path)
        self.files = files
        self._open = {}
        self._safe_open = safe_open

    def _handle(self, name: str):
        if name not in self.files:
            raise KeyError(f"{name!r} is not in the checkpoint ({len(self.files)} tensors)")
        file = self.files[name]
        if file not in self._open:
            self._open[file] = self._safe_open(str(file), framework="pt")
        return self._open[file]

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        return self._handle(name).get_slice(name)[lo:hi]

    def piece(self, piece: Piece) -> torch.Tensor:
        """Reads only the rows the piece holds (in runs of consecutive rows)."""
        rows = piece.index[0] if piece.index is not None and piece.index[0] is not None else None
        if rows is None:
            return super().piece(piece)
        part = torch.cat([self.rows(piece.global_name, a, b) for a, b in _runs(rows.tolist())])
        order = torch.argsort(torch.argsort(rows))  # the rows as the piece orders them
        part = part.index_select(0, order)
        rest = Piece(piece.subnet_name, piece.global_name, (None, *piece.index[1:]))
        return rest.gather(part)


def _runs(values: list[int]) -> Iterator[tuple[int, int]]:
    """[lo, hi) runs of consecutive values, ascending."""
    values = sorted(values)
    start = prev = values[0]
    for v in values[1:]:
        if v != prev + 1:
            yield start, prev + 1
            start = v
        prev = v
    yield start, prev + 1


def _tensor_owners(model: nn.Module) -> dict[str, str]:
    """Global tensor name -> path of the module that owns it directly."""
    out = {}
    for path, module in model.named_modules():
        for attr, t in (*module._parameters.items(), *module._buffers.items()):
            if t is not None:
                out[f"{path}.{attr}" if path else attr] = path
    return out


def _module_seed(seed: int, path: str) -> int:
    return int.from_bytes(hashlib.sha256(f"ist-init:{seed}:{path}".encode()).digest()[:8], "little") >> 1


def materialize_module(model: nn.Module, path: str, seed: int, device: str | torch.device = "cpu"
                       ) -> dict[str, torch.Tensor]:
    """The initial tensors of module ``path`` of a meta-device ``model`` (global names):
    a copy of the module is allocated on ``device`` and initialized by its own
    ``reset_parameters()`` (a transformers model: its ``_init_weights``), under a generator
    seeded by (seed, path) so every rank gets the same values."""
    module = model.get_submodule(path)
    copied = copy.deepcopy(module).to_empty(device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_module_seed(seed, path))
        _initialize(model, copied, path)
    prefix = f"{path}." if path else ""
    return {prefix + attr: t.detach() for attr, t in (*copied._parameters.items(), *copied._buffers.items())
            if t is not None}


def _initialize(model: nn.Module, module: nn.Module, path: str) -> None:
    init_weights = getattr(model, "_init_weights", None)
    if init_weights is not None and hasattr(model, "config"):  # a transformers PreTrainedModel
        for sub in module.modules():
            init_weights(sub)
        return
    initialized = False
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
            initialized = True
    if not initialized and any(t is not None for t in (*module._parameters.values(), *module._buffers.values())):
        raise ValueError(f"module {path!r} ({type(module).__name__}) has no reset_parameters(): it cannot be initialized "
                         "from the meta device. Build the model on the CPU, or start from a checkpoint")


def materialize(model: nn.Module, seed: int, device: str | torch.device = "cpu") -> nn.Module:
    """A real copy of a meta-device ``model`` with exactly the values :class:`MetaInit`
    gives its pieces (for a single-process reference, or to inspect the initial model)."""
    real = copy.deepcopy(model).to_empty(device=device)
    source = MetaInit(model, seed)
    with torch.no_grad():
        for name, t in state_tensors(real).items():
            t.copy_(source.tensor(name))
        for module in real.modules():  # integer buffers (BatchNorm's num_batches_tracked)
            for attr, b in module._buffers.items():
                if b is not None and not b.is_floating_point():
                    b.zero_()
    return real


__all__ = ["InitialValues", "MetaInit", "ModelValues", "SafetensorsValues", "is_meta", "materialize",
           "materialize_module"]
