"""What a decomposition is, independent of the model family.

A decomposition splits a global model into *groups* of interchangeable *units*
(ResIST, arXiv 2107.00961: the blocks of a residual stage; IST, arXiv 1910.02120: the
neurons of a hidden layer). An :class:`Assignment` gives every subnet a sorted tuple of
unit indices per group. A subnet is a physically smaller module of fixed shape; a
:class:`~ist_accel.tensors.Piece` records where each of its tensors comes from in the
global model for one assignment, so refilling, writing back and exchanging are generic
index operations (:mod:`.pieces`, :mod:`ist_accel.transfer`).
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..tensors import Piece, state_tensors
from .scaling import Scaling, evaluation_view, fold_scalings, scaling_factors, scaling_hooks


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


def check_num_subnets(num_subnets: object) -> None:
    """Raise ``ValueError`` unless ``num_subnets`` is an integer >= 1."""
    if isinstance(num_subnets, bool) or not isinstance(num_subnets, int) or num_subnets < 1:
        raise ValueError(f"num_subnets must be an integer >= 1, got {num_subnets!r}")


def seeded_generator(seed: int, round_: int, group: str) -> torch.Generator:
    """A generator that depends only on (seed, round, group): the same on every rank."""
    digest = hashlib.sha256(f"ist:{seed}:{round_}:{group}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class Decomposition(ABC):
    """Splits one global model into ``num_subnets`` fixed-shape subnets per round."""

    num_subnets: int

    @property
    @abstractmethod
    def groups(self) -> dict[str, int]:
        """Group name -> number of interchangeable units in it."""

    #: ``ISTConfig.assignment == "rotate"`` (:func:`~ist_accel.decompositions.decompose` sets it)
    rotate: bool = False

    @abstractmethod
    def draw(self, round_: int) -> Assignment:
        """The papers' random assignment of ``round_``: a pure function of (seed, round)."""

    def assignment(self, round_: int) -> Assignment:
        """The units of each subnet in ``round_``: :meth:`draw`'s, or with :attr:`rotate` the
        split drawn at the cycle's first round (every S rounds) with its parts moved on by
        one subnet each round, so every unit visits every subnet (node) once per cycle."""
        if not self.rotate:
            return self.draw(round_)
        S = self.num_subnets
        drawn = self.draw(round_ - round_ % S)
        return Assignment(round_, tuple(drawn.units[(s + round_) % S] for s in range(S)))

    def check_rotation(self) -> None:
        """Raise ``ValueError`` unless every subnet holds as many units of each group (a
        rotated part must fit the subnet it moves to)."""
        units = self.draw(0).units
        for group in self.groups:
            counts = [len(u.get(group, ())) for u in units]
            if len(set(counts)) > 1:
                raise ValueError(f"assignment='rotate' moves each subnet's units to the next subnet, so every subnet "
                                 f"must hold as many units of each group; {group!r} gives {counts} per subnet "
                                 "(choose num_subnets dividing its units, or min_blocks, or assignment='random')")

    @abstractmethod
    def build_subnet(self, subnet: int) -> nn.Module:
        """A new fixed-shape module for subnet ``subnet`` (values are refilled later)."""

    @abstractmethod
    def pieces(self, assignment: Assignment, subnet: int) -> list[Piece]:
        """Where each tensor of ``subnet`` comes from under ``assignment``."""

    @contextlib.contextmanager
    def eval_view(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """The global model (or ``model``) with every unit active and :meth:`eval_scalings`
        applied as forward hooks, removed on exit."""
        model = self.model if model is None else model
        with evaluation_view(model, scaling_hooks(model, self.eval_scalings())) as view:
            yield view

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
        """Shape of every averaged tensor of the global model, by name."""
        return {n: t.shape for n, t in state_tensors(self.model).items()}

    def subnet_numel(self, subnet: int, params_only: bool = True) -> int:
        """Elements of subnet ``subnet`` (parameters only by default)."""
        shapes = self.global_shapes()
        names = {n for n, _ in self.model.named_parameters()} if params_only else set(shapes)
        pieces = self.pieces(self.assignment(0), subnet)
        return sum(p.numel(shapes[p.global_name]) for p in pieces if p.global_name in names)

    model: nn.Module


__all__ = ["Assignment", "Decomposition", "check_num_subnets", "seeded_generator"]
