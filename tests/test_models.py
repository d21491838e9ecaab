"""Tests for ist_accel.models: the registry, pre-activation ResNets and the MLP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from ist_accel.models import (
    MLP,
    MODEL_NAMES,
    PreActBasicBlock,
    PreActBottleneck,
    PreActResNetCifar,
    build_model,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run single-threaded: robust timing when other processes share the (2) cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _forward(model: nn.Module, size: int, batch: int = 2) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, 3, size, size))


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n != "mlp"] + ["timm:resnet18"])
def test_builtin_models_forward(name: str) -> None:
    size = 32 if name.startswith("preact_resnet") else 64
    model = build_model(name, num_classes=7)
    assert _forward(model, size).shape == (2, 7)


@pytest.mark.parametrize("name", ["preact_resnet18", "preact_resnet50"])
def test_imagenet_stem_forward(name: str) -> None:
    model = build_model(name, num_classes=5, stem="imagenet")
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert _forward(model, 64).shape == (2, 5)


def test_mlp_builds_from_registry() -> None:
    model = build_model("mlp", num_classes=10, in_features=784)
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [1024, 1024, 10]
    model = build_model("mlp", num_classes=3, in_features=3 * 32 * 32, hidden=[64])
    assert _forward(model, 32).shape == (2, 3)


def test_param_counts() -> None:
    # Measured: 42,505,290 (the torchvision post-activation resnet101 has 42.5M too).
    assert 42_400_000 < _num_params(build_model("preact_resnet101")) < 42_600_000
    # He et al. (2016) report 0.27M parameters for ResNet-20 on CIFAR-10.
    assert 265_000 < _num_params(build_model("preact_resnet20")) < 275_000


def test_registry_errors() -> None:
    with pytest.raises(ValueError, match="'resnet9000'.*preact_resnet18"):
        build_model("resnet9000")
    with pytest.raises(ValueError, match="in_features"):
        build_model("mlp")
    with pytest.raises(ValueError, match="stem"):
        build_model("preact_resnet18", stem="tiny")
    with pytest.raises(ValueError, match="stem"):
        build_model("preact_resnet20", stem="imagenet")
    assert isinstance(build_model("preact_resnet20", stem="cifar"), PreActResNetCifar)
    with pytest.raises(ValueError, match="stem"):
        build_model("resnet18", stem="cifar")
    with pytest.raises(ValueError, match="in_features"):
        build_model("resnet18", in_features=10)


def test_cifar_depth_validation() -> None:
    with pytest.raises(ValueError, match=r"depth 21\b.*\[20, 32, 56, 110\]"):
        PreActResNetCifar(21)


@pytest.mark.parametrize("name", ["preact_resnet18", "preact_resnet50", "preact_resnet56"])
def test_non_first_blocks_share_signature(name: str) -> None:
    model = build_model(name)
    stages = [m for n, m in model.named_children() if n.startswith("layer")]
    assert len(stages) == (3 if name == "preact_resnet56" else 4)
    for stage in stages:
        assert isinstance(stage, nn.Sequential) and len(stage) >= 2
        signatures = [[(k, tuple(v.shape)) for k, v in block.state_dict().items()] for block in stage]
        assert all(sig == signatures[1] for sig in signatures[1:])
        assert all(not hasattr(block, "shortcut") for block in stage[1:])
    assert hasattr(stages[1][0], "shortcut")  # the first block of a downsampling stage projects


def test_shortcut_only_when_shape_changes() -> None:
    assert not hasattr(PreActBasicBlock(16, 16), "shortcut")
    assert hasattr(PreActBasicBlock(16, 32), "shortcut")
    assert hasattr(PreActBasicBlock(16, 16, stride=2), "shortcut")
    assert not hasattr(PreActBottleneck(256, 64), "shortcut")
    assert hasattr(PreActBottleneck(64, 64), "shortcut")
    assert "shortcut" not in dict(PreActBasicBlock(16, 16).named_modules())


@pytest.mark.parametrize(
    "block, last",
    [
        (PreActBasicBlock(8, 8), "conv2"),
        (PreActBottleneck(32, 8), "conv3"),
        (PreActBottleneck(16, 8, stride=2), "conv3"),
    ],
)
def test_block_structure(block: nn.Module, last: str) -> None:
    order: list[str] = []
    for name, child in block.named_children():
        child.register_forward_hook(lambda *_, name=name: order.append(name))
    block.eval()
    x = torch.randn(2, block.bn1.num_features, 8, 8)
    out = block(x)
    assert order[0] == "bn1" and order[-1] == last
    # Zeroing the last conv leaves only the shortcut: identity or a projection of relu(bn1(x)).
    with torch.no_grad():
        getattr(block, last).weight.zero_()
        expected = block.shortcut(torch.relu(block.bn1(x))) if hasattr(block, "shortcut") else x
        torch.testing.assert_close(block(x), expected)
    assert out.shape[1] == getattr(block, last).out_channels


def test_init() -> None:
    model = build_model("preact_resnet20")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    std = model.conv1.weight.std().item()
    fan_out = model.conv1.out_channels * 9
    assert abs(std - (2 / fan_out) ** 0.5) < 0.3 * (2 / fan_out) ** 0.5


@pytest.mark.parametrize(
    "norm, norm_type", [(None, None), ("batch", nn.BatchNorm1d), ("layer", nn.LayerNorm)]
)
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_mlp_shapes(norm: str | None, norm_type: type | None, activation: str) -> None:
    model = MLP(784, [32, 16], 10, norm=norm, activation=activation, dropout=0.1)
    assert isinstance(model[0], nn.Flatten)
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [32, 16, 10]
    norms = [m for m in model if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm))]
    assert len(norms) == (0 if norm_type is None else 2) and all(isinstance(m, norm_type) for m in norms)
    assert sum(isinstance(m, nn.Dropout) for m in model) == 2
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert model(torch.randn(4, 784)).shape == (4, 10)


def test_mlp_validation() -> None:
    with pytest.raises(ValueError, match="norm"):
        MLP(4, [4], 2, norm="group")
    with pytest.raises(ValueError, match="activation"):
        MLP(4, [4], 2, activation="swish")
    assert not any(isinstance(m, nn.Dropout) for m in MLP(4, [4], 2))
