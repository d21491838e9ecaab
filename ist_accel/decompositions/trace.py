"""Find a model's structure by running it once: which modules run, in what order,
with what input and output, so decompositions never depend on class names."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Call:
    """One module call seen during the trace (modules called more than once: the last)."""

    name: str
    order: int
    input: torch.Tensor | None
    output: object
    input_id: int
    output_id: int
    calls: int = 1


@dataclass
class Trace:
    calls: dict[str, Call] = field(default_factory=dict)
    leaf_order: list[str] = field(default_factory=list)

    def leaves_under(self, prefix: str) -> list[str]:
        """Leaf modules with parameters under ``prefix``, in execution order."""
        return [n for n in self.leaf_order if n.startswith(prefix + ".")]


def default_example_input(model: nn.Module) -> torch.Tensor:
    """A small input matching the model's first layer (images: 1 x C x 32 x 32) in its dtype,
    on the model's device (a meta-device model is traced on meta tensors: shapes, no values)."""
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            shape: tuple[int, ...] = (1, module.in_channels, 32, 32)
        elif isinstance(module, nn.Conv1d):
            shape = (1, module.in_channels, 64)
        elif isinstance(module, nn.Linear):
            shape = (2, module.in_features)
        else:
            continue
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(module.weight.dtype)
        return x.to(device) if device.type == "meta" else x
    raise ValueError(
        f"cannot guess an input for {type(model).__name__}: it has no Conv or Linear layer; "
        "pass example_input"
    )


def trace_model(model: nn.Module, example_input: torch.Tensor) -> Trace:
    """Run ``model`` once in eval mode under hooks and record every module call."""
    trace = Trace()
    counter = [0]
    handles = []
    pending: dict[str, tuple[torch.Tensor | None, int]] = {}

    def pre_hook(name):
        def hook(module, args):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            pending[name] = (None if x is None else x.detach().clone(), id(args[0]) if args else 0)

        return hook

    def post_hook(name, is_leaf):
        def hook(module, args, output):
            x, x_id = pending.pop(name, (None, 0))
            counter[0] += 1
            prev = trace.calls.get(name)
            out = output.detach().clone() if isinstance(output, torch.Tensor) else output
            trace.calls[name] = Call(
                name, counter[0], x, out, x_id, id(output), calls=(prev.calls + 1) if prev else 1
            )
            if is_leaf:
                trace.leaf_order.append(name)

        return hook

    for name, module in model.named_modules():
        if not name:
            continue
        is_leaf = not any(True for _ in module.children()) and any(
            True for _ in module.parameters(recurse=False)
        )
        handles.append(module.register_forward_pre_hook(pre_hook(name)))
        handles.append(module.register_forward_hook(post_hook(name, is_leaf)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return trace


def signature(module: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Names and shapes of a module's tensors: equal signatures = interchangeable."""
    return tuple((n, tuple(t.shape)) for n, t in module.state_dict().items())


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(get_module(model, parent), child, module)
