"""What a subnet is, independent of the model family.

A decomposition splits a global model into *groups* of interchangeable *units*
(ResIST: the blocks of a residual stage; IST: the neurons of a hidden layer). An
:class:`Assignment` gives every subnet a sorted tuple of unit indices per group.
A subnet is a physically smaller module of fixed shape; :class:`Piece` records
where each of its tensors comes from in the global model for one assignment, so
refilling, writing back and exchanging are generic index operations.
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

Index = tuple["torch.Tensor | None", ...] | None
# One evaluation-view scaling: (module name in the global model, factor, "in" | "out"):
# the module's input or output is multiplied by the factor when the global model is evaluated.
Scaling = tuple[str, float, str]


@dataclass(frozen=True)
class Assignment:
    """Which units each subnet holds in one round: ``units[s][group]`` is sorted."""

    round: int
    units: tuple[Mapping[str, tuple[int, ...]], ...]

    @property
    def num_subnets(self) -> int:
        return len(self.units)

    def digest(self) -> str:
        """A stable hash, so ranks can confirm they derived the same assignment."""
        blob = repr([(g, u[g]) for u in self.units for g in sorted(u)]).encode()
        return hashlib.sha256(f"{self.round}:".encode() + blob).hexdigest()[:16]


@dataclass(frozen=True)
class Piece:
    """Subnet tensor ``subnet_name`` equals ``global[global_name][index]``.

    ``index`` is ``None`` for the whole tensor, else one entry per leading dim:
    a sorted ``LongTensor`` of kept positions or ``None`` for a dim kept whole.
    """

    subnet_name: str
    global_name: str
    index: Index = None

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Read this piece out of the global tensor (a copy)."""
        if self.index is None:
            return tensor.detach().clone()
        out = tensor.detach()
        for dim, idx in enumerate(self.index):
            if idx is not None:
                out = out.index_select(dim, idx.to(out.device))
        return out.clone()

    def scatter_add(self, target: torch.Tensor, value: torch.Tensor) -> None:
        """``target[index] += value`` (in place)."""
        if self.index is None:
            target.add_(value)
            return
        target.index_put_(self.grid(target), value, accumulate=True)

    def numel(self, global_shape: torch.Size) -> int:
        n = 1
        for dim, size in enumerate(global_shape):
            idx = self.index[dim] if self.index is not None and dim < len(self.index) else None
            n *= size if idx is None else len(idx)
        return n

    def grid(self, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        axes = []
        for dim, size in enumerate(target.shape):
            idx = self.index[dim] if dim < len(self.index) else None
            axes.append(torch.arange(size, device=target.device) if idx is None else idx.to(target.device))
        return torch.meshgrid(*axes, indexing="ij")


def check_num_subnets(num_subnets: object) -> None:
    if isinstance(num_subnets, bool) or not isinstance(num_subnets, int) or num_subnets < 1:
        raise ValueError(f"num_subnets must be an integer >= 1, got {num_subnets!r}")


def seeded_generator(seed: int, round_: int, group: str) -> torch.Generator:
    """A generator that depends only on (seed, round, group): the same on every rank."""
    digest = hashlib.sha256(f"ist:{seed}:{round_}:{group}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and floating-point buffers: everything that is averaged.

    Integer buffers (BatchNorm's ``num_batches_tracked``) stay local to a subnet.
    """
    out = dict(module.named_parameters())
    out.update((n, b) for n, b in module.named_buffers() if b.is_floating_point())
    return out


class TensorSlots:
    """Fast repeated :func:`state_tensors` of one module: where each tensor sits (owning
    module, attribute) is found once; every lookup reads the slot again, so a tensor that
    ``module.to()`` replaced is seen."""

    def __init__(self, module: nn.Module) -> None:
        owners = dict(module.named_modules())
        self.slots = []
        for name in state_tensors(module):
            path, _, attr = name.rpartition(".")
            owner = owners[path]
            self.slots.append((name, owner._parameters if attr in owner._parameters else owner._buffers, attr))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: store[attr].detach() for name, store, attr in self.slots}


class Decomposition(ABC):
    """Splits one global model into ``num_subnets`` fixed-shape subnets per round."""

    num_subnets: int

    @property
    @abstractmethod
    def groups(self) -> dict[str, int]:
        """Group name -> number of interchangeable units in it."""

    @abstractmethod
    def assignment(self, round_: int) -> Assignment:
        """The units of each subnet in ``round_``: a pure function of (seed, round)."""

    @abstractmethod
    def build_subnet(self, subnet: int) -> nn.Module:
        """A new fixed-shape module for subnet ``subnet`` (values are refilled later)."""

    @abstractmethod
    def pieces(self, assignment: Assignment, subnet: int) -> list[Piece]:
        """Where each tensor of ``subnet`` comes from under ``assignment``."""

    @abstractmethod
    def eval_view(self, model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
        """The global model with every unit active and eval scaling applied."""

    def eval_scalings(self) -> list[Scaling]:
        """The scalings :meth:`eval_view` applies, by module name (none by default)."""
        return []

    def export_state(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global model's state dict with the evaluation view folded into its weights:
        loaded into the plain architecture, it computes what :meth:`eval_view` computes.
        ``state_dict`` (raw training values, keys as in the global model) is not modified.
        Raises ``ValueError`` naming a scaled module that has no weights to fold into."""
        return fold_scalings(self.model, state_dict, self.eval_scalings())

    def export_factors(self) -> dict[str, float]:
        """Per exported tensor, the factor that folds the evaluation view into it (tensors
        not listed are exported as trained)."""
        return scaling_factors(self.model, self.eval_scalings())

    @abstractmethod
    def shared_names(self) -> set[str]:
        """Global tensors that every subnet holds whole in every round."""

    # ---- generic operations -------------------------------------------------

    @property
    def tensor_names(self) -> list[str]:
        """Names of the global model's averaged tensors (:func:`state_tensors`), in order."""
        names = self.__dict__.get("_tensor_names")
        if names is None:
            names = self.__dict__["_tensor_names"] = list(state_tensors(self.model))
        return names

    def global_shapes(self) -> dict[str, torch.Size]:
        return {n: t.shape for n, t in state_tensors(self.model).items()}

    def subnet_numel(self, subnet: int, params_only: bool = True) -> int:
        """Elements of subnet ``subnet`` (parameters only by default)."""
        shapes = self.global_shapes()
        names = {n for n, _ in self.model.named_parameters()} if params_only else set(shapes)
        pieces = self.pieces(self.assignment(0), subnet)
        return sum(p.numel(shapes[p.global_name]) for p in pieces if p.global_name in names)

    model: nn.Module


def load_subnet(
    subnet: nn.Module, global_state: Mapping[str, torch.Tensor], pieces: list[Piece]
) -> None:
    """Refill ``subnet`` in place from the global tensors (start of a round)."""
    local = state_tensors(subnet)
    with torch.no_grad():
        for piece in pieces:
            local[piece.subnet_name].copy_(piece.gather(global_state[piece.global_name]))


def keep_frozen(subnet: nn.Module, frozen: set[str], pieces: list[Piece]) -> None:
    """A subnet parameter trains only if the global parameter it holds this round does:
    ``requires_grad=False`` of the global model is kept under every decomposition."""
    params = dict(subnet.named_parameters())
    for piece in pieces:
        param = params.get(piece.subnet_name)
        if param is not None:
            param.requires_grad_(piece.global_name not in frozen)


def kept_tensors(held: list[Piece], following: list[Piece]) -> dict[str, str]:
    """Optimizer-state policy ``local``: which subnet tensors of the next round hold exactly
    the global values a tensor of this round held (same global tensor, same index), as
    ``{next subnet name: this round's subnet name}``. Their optimizer state can stay where
    it is (the shared set always; a ResIST block dealt to the same group again, even in
    another slot); every other tensor starts fresh."""

    def signature(piece: Piece) -> tuple:
        index = None if piece.index is None else tuple(None if i is None else tuple(i.tolist()) for i in piece.index)
        return piece.global_name, index

    def by_tensor(pieces: list[Piece]) -> dict[str, tuple]:
        out: dict[str, list[tuple]] = {}
        for piece in pieces:
            out.setdefault(piece.subnet_name, []).append(signature(piece))
        return {name: tuple(sorted(sigs, key=repr)) for name, sigs in out.items()}

    source = {sig: name for name, sig in by_tensor(held).items()}
    return {name: source[sig] for name, sig in by_tensor(following).items() if sig in source}


def average_into_global(
    global_state: Mapping[str, torch.Tensor],
    contributions: list[tuple[list[Piece], Mapping[str, torch.Tensor]]],
) -> dict[str, torch.Tensor]:
    """Average each global element over the subnets that held it (DESIGN: averaging).

    ``contributions`` is one ``(pieces, subnet_tensors)`` pair per subnet. Elements no
    subnet held keep their value; an element with one holder is a plain copy. Returns, per
    tensor some subnet held, the boolean mask of its held elements.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for pieces, tensors in contributions:
        for piece in pieces:
            g = global_state[piece.global_name]
            if piece.global_name not in sums:
                sums[piece.global_name] = torch.zeros_like(g, dtype=torch.float64)
                counts[piece.global_name] = torch.zeros(g.shape, dtype=torch.float64)
            value = tensors[piece.subnet_name].detach().to(torch.float64)
            piece.scatter_add(sums[piece.global_name], value)
            piece.scatter_add(counts[piece.global_name], torch.ones_like(value))
    with torch.no_grad():
        for name, total in sums.items():
            held = counts[name] > 0
            g = global_state[name]
            mean = total / counts[name].clamp_min(1)
            g.copy_(torch.where(held, mean, g.to(torch.float64)).to(g.dtype))
    return {name: count > 0 for name, count in counts.items()}


_FOLDABLE_OUT = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.LayerNorm,
                 nn.GroupNorm)
_FOLDABLE_IN = (nn.Linear, nn.modules.conv._ConvNd)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear with its weight stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def fold_scalings(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                  scalings: list[Scaling]) -> dict[str, torch.Tensor]:
    """``state_dict`` with each (module, factor, where) scaling folded into the module's
    parameters (:func:`scaling_factors`)."""
    out = dict(state_dict)
    for key, factor in scaling_factors(model, scalings).items():
        if key not in out:
            raise ValueError(f"cannot fold the evaluation scaling into {key!r}: the state dict has no {key!r} "
                             "(pass the global model's full state dict)")
        out[key] = (out[key].detach() * factor).to(out[key].dtype)  # new tensors: tied weights stay untouched
    return out


def scaling_factors(model: nn.Module, scalings: list[Scaling]) -> dict[str, float]:
    """The factor each exported tensor is multiplied by to fold ``scalings`` into it. An
    output scaling of an affine module (Linear, ConvNd, transformers Conv1D, BatchNorm /
    LayerNorm / GroupNorm with affine parameters) multiplies its weight and bias; an input scaling of a Linear, ConvNd or Conv1D multiplies its weight only (the
    layer is linear in its input). Anything else raises ``ValueError`` naming the module."""
    factors: dict[str, float] = {}
    for name, factor, where in scalings:
        module = model.get_submodule(name)
        kinds = _FOLDABLE_OUT if where == "out" else _FOLDABLE_IN
        if where not in ("in", "out"):
            raise ValueError(f"scaling of {name!r}: where must be 'in' or 'out', got {where!r}")
        if not (isinstance(module, kinds) or _is_hf_conv1d(module)):
            raise ValueError(
                f"cannot fold the evaluation scaling ({where}put x {factor:g}) of {name!r} into the exported weights: "
                f"it is a {type(module).__name__}; foldable are {', '.join(k.__name__ for k in kinds)} and "
                "transformers' Conv1D. Export the eval view's outputs another way, or turn eval_scaling off")
        tensors = ["weight", "bias"] if where == "out" else ["weight"]
        present = [t for t in tensors if getattr(module, t, None) is not None]
        if "weight" not in present:
            raise ValueError(
                f"cannot fold the evaluation scaling ({where}put x {factor:g}) of {name!r} into the exported weights: "
                f"its {type(module).__name__} has no affine weight (affine=False / elementwise_affine=False)")
        for t in present:
            key = f"{name}.{t}" if name else t
            factors[key] = factors.get(key, 1.0) * factor
    return factors


def scaling_hooks(model: nn.Module, scalings: list[Scaling]) -> list[tuple[nn.Module, float, str]]:
    """The forward hooks of :func:`forward_scaling` for ``scalings`` on ``model``."""
    return [(model.get_submodule(name), factor, where) for name, factor, where in scalings]


@contextlib.contextmanager
def forward_scaling(hooks: list[tuple[nn.Module, float, str]]) -> Iterator[None]:
    """Temporarily multiply a module's output (``"out"``) or input (``"in"``) by a factor."""
    handles = []
    for module, factor, where in hooks:
        if where == "out":
            handles.append(module.register_forward_hook(lambda m, i, o, f=factor: o * f))
        else:
            handles.append(
                module.register_forward_pre_hook(lambda m, i, f=factor: (i[0] * f, *i[1:]))
            )
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def evaluation_view(model: nn.Module, hooks: list[tuple[nn.Module, float, str]]) -> Iterator[nn.Module]:
    """``model`` in eval mode with the scaling ``hooks`` applied; its mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with forward_scaling(hooks):
            yield model
    finally:
        model.train(was_training)
