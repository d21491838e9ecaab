"""Pre-activation ResNets (He et al. 2016, "Identity Mappings in Deep Residual Networks").

These are the networks used by ResIST (arXiv 2107.00961). Within a stage, every block
after the first keeps its input shape and has no shortcut module, so all those blocks
share identical parameter names and shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PreActBasicBlock",
    "PreActBottleneck",
    "PreActResNet",
    "PreActResNetCifar",
    "IMAGENET_DEPTHS",
    "CIFAR_DEPTHS",
    "preact_resnet",
]


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, out_planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck block: 1x1 -> 3x3 (strided) -> 1x1 (x4 channels)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


Block = type[PreActBasicBlock] | type[PreActBottleneck]


def _make_layer(block: Block, in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    """Stack ``num_blocks`` blocks; only the first one may change shape."""
    layers = []
    for i in range(num_blocks):
        layers.append(block(in_planes, planes, stride if i == 0 else 1))
        in_planes = planes * block.expansion
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions; BatchNorm weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PreActResNet(nn.Module):
    """Four-stage pre-activation ResNet with a CIFAR (3x3) or ImageNet (7x7 + max-pool) stem."""

    def __init__(
        self,
        block: Block,
        num_blocks: list[int],
        num_classes: int = 10,
        stem: str = "cifar",
        base_width: int = 64,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError(f"num_blocks must have 4 entries, got {num_blocks!r}")
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, base_width, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.stem = stem
        widths = [base_width, base_width * 2, base_width * 4, base_width * 8]
        in_planes = base_width
        for i, (width, n, stride) in enumerate(zip(widths, num_blocks, (1, 2, 2, 2)), start=1):
            setattr(self, f"layer{i}", _make_layer(block, in_planes, width, n, stride))
            in_planes = width * block.expansion
        self.bn = nn.BatchNorm2d(in_planes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(self.conv1(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.avgpool(F.relu(self.bn(out)))
        return self.linear(torch.flatten(out, 1))


class PreActResNetCifar(nn.Module):
    """He et al.'s CIFAR pre-activation ResNet: three stages of (depth - 2) / 6 basic blocks."""

    def __init__(self, depth: int, num_classes: int = 10, base_width: int = 16) -> None:
        super().__init__()
        if depth not in CIFAR_DEPTHS:
            raise ValueError(
                f"unsupported CIFAR pre-act ResNet depth {depth!r}; accepted depths: {CIFAR_DEPTHS}"
            )
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, base_width, 3, stride=1, padding=1, bias=False)
        self.layer1 = _make_layer(PreActBasicBlock, base_width, base_width, n, 1)
        self.layer2 = _make_layer(PreActBasicBlock, base_width, base_width * 2, n, 2)
        self.layer3 = _make_layer(PreActBasicBlock, base_width * 2, base_width * 4, n, 2)
        self.bn = nn.BatchNorm2d(base_width * 4)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(base_width * 4, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = self.avgpool(F.relu(self.bn(out)))
        return self.linear(torch.flatten(out, 1))


IMAGENET_DEPTHS: dict[int, tuple[Block, list[int]]] = {
    18: (PreActBasicBlock, [2, 2, 2, 2]),
    34: (PreActBasicBlock, [3, 4, 6, 3]),
    50: (PreActBottleneck, [3, 4, 6, 3]),
    101: (PreActBottleneck, [3, 4, 23, 3]),
    152: (PreActBottleneck, [3, 8, 36, 3]),
}
CIFAR_DEPTHS: list[int] = [20, 32, 56, 110]


def preact_resnet(depth: int, num_classes: int = 10, stem: str = "cifar") -> PreActResNet:
    """Build a four-stage pre-activation ResNet of depth 18, 34, 50, 101 or 152."""
    if depth not in IMAGENET_DEPTHS:
        accepted = sorted(IMAGENET_DEPTHS)
        raise ValueError(f"unsupported pre-act ResNet depth {depth!r}; accepted depths: {accepted}")
    block, num_blocks = IMAGENET_DEPTHS[depth]
    return PreActResNet(block, num_blocks, num_classes=num_classes, stem=stem)
