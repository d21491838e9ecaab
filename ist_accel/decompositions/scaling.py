"""The evaluation view's scaling (IST arXiv 1910.02120 Sec. 3, ResIST arXiv 2107.00961
Sec. 3): a subnet learns a branch's output from a fraction of its units, so the global
model is evaluated with that branch scaled. A scaling is applied as forward hooks
(:func:`evaluation_view`) or folded into the exported weights (:func:`fold_scalings`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

# One evaluation-view scaling: (module name in the global model, factor, "in" | "out"):
# the module's input or output is multiplied by the factor when the global model is evaluated.
Scaling = tuple[str, float, str]

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
    LayerNorm / GroupNorm with affine parameters) multiplies its weight and bias; an input
    scaling of a Linear, ConvNd or Conv1D multiplies its weight only (the layer is linear
    in its input). Anything else raises ``ValueError`` naming the module."""
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


__all__ = ["Scaling", "evaluation_view", "fold_scalings", "forward_scaling", "scaling_factors",
           "scaling_hooks"]
