"""Models and deterministic batches shared by workers and the single-process reference."""

import torch
from torch import nn

from ist_accel.models import MLP, build_model


def make_model(name: str) -> nn.Module:
    torch.manual_seed(1234)
    if name == "resnet":
        return build_model("preact_resnet32", num_classes=4)  # layer3: 4 partitionable blocks, BatchNorm
    if name == "mlp":
        return MLP(12, [16, 16], 3, norm="batch")
    raise ValueError(name)


def batch_for(name: str, subnet: int, replica: int, step: int):
    g = torch.Generator().manual_seed(1000 * subnet + 100 * replica + step)
    if name == "resnet":
        return torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 4, (4,), generator=g)
    return torch.randn(6, 12, generator=g), torch.randint(0, 3, (6,), generator=g)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def eval_items(name: str) -> list:
    """A small deterministic evaluation set of (input, label) items."""
    g = torch.Generator().manual_seed(99)
    if name == "resnet":
        xs, ys = torch.randn(24, 3, 16, 16, generator=g), torch.randint(0, 4, (24,), generator=g)
    else:
        xs, ys = torch.randn(50, 12, generator=g), torch.randint(0, 3, (50,), generator=g)
    return list(zip(xs, ys))
