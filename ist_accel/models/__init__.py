"""Model registry: pre-activation ResNets, an MLP, torchvision ResNets and timm models."""

from __future__ import annotations

import logging

from torch import nn

from .mlp import MLP
from .preact_resnet import (
    CIFAR_DEPTHS,
    IMAGENET_DEPTHS,
    PreActBasicBlock,
    PreActBottleneck,
    PreActResNet,
    PreActResNetCifar,
    preact_resnet,
)

__all__ = [
    "MLP",
    "MODEL_NAMES",
    "PreActBasicBlock",
    "PreActBottleneck",
    "PreActResNet",
    "PreActResNetCifar",
    "build_model",
    "preact_resnet",
]

logger = logging.getLogger(__name__)

PREACT_NAMES = [f"preact_resnet{d}" for d in sorted(IMAGENET_DEPTHS)]
PREACT_CIFAR_NAMES = [f"preact_resnet{d}" for d in CIFAR_DEPTHS]
TORCHVISION_NAMES = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
]
DEFAULT_MLP_HIDDEN = [1024, 1024]
MODEL_NAMES: list[str] = [*PREACT_NAMES, *PREACT_CIFAR_NAMES, *TORCHVISION_NAMES, "mlp"]


def build_model(
    name: str,
    num_classes: int = 10,
    *,
    stem: str | None = None,
    in_features: int | None = None,
    hidden: list[int] | None = None,
) -> nn.Module:
    """Build a model by name: one of ``MODEL_NAMES`` or ``timm:<name>`` (no pretrained weights).

    ``stem`` ("cifar", the default, or "imagenet") applies only to ``preact_resnet18/34/50/101/152``
    (the CIFAR-style ``preact_resnet20/32/56/110`` accept only "cifar");
    ``in_features`` (required) and ``hidden`` (default ``[1024, 1024]``) only to ``mlp``.
    """
    if stem is not None and name not in PREACT_NAMES and not (stem == "cifar" and name in PREACT_CIFAR_NAMES):
        raise ValueError(f"stem={stem!r} only applies to {PREACT_NAMES}, not to {name!r}")
    if (in_features is not None or hidden is not None) and name != "mlp":
        raise ValueError(f"in_features/hidden only apply to 'mlp', not to {name!r}")

    if name in PREACT_NAMES:
        depth = int(name.removeprefix("preact_resnet"))
        model: nn.Module = preact_resnet(depth, num_classes, stem or "cifar")
    elif name in PREACT_CIFAR_NAMES:
        model = PreActResNetCifar(int(name.removeprefix("preact_resnet")), num_classes)
    elif name in TORCHVISION_NAMES:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    elif name.startswith("timm:") and len(name) > len("timm:"):
        import timm

        model = timm.create_model(name.removeprefix("timm:"), pretrained=False, num_classes=num_classes)
    elif name == "mlp":
        if in_features is None:
            raise ValueError("model 'mlp' requires in_features (e.g. 784 for MNIST)")
        model = MLP(in_features, list(DEFAULT_MLP_HIDDEN if hidden is None else hidden), num_classes)
    else:
        raise ValueError(f"unknown model name {name!r}; accepted: {MODEL_NAMES} or 'timm:<timm model name>'")
    logger.debug("built %s with %d parameters", name, sum(p.numel() for p in model.parameters()))
    return model
