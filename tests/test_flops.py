"""Subnets are physically small: their forward+backward costs only their share."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ist_accel.decompositions import MLPDecomposition, ResidualDecomposition, load_subnet, state_tensors
from ist_accel.models import MLP, build_model


def train_flops(module, x, target_classes=10):
    module.train()
    with FlopCounterMode(display=False) as counter:
        out = module(x)
        out.float().pow(2).mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("S", [2, 4])
def test_resist_subnet_flops_share(S):
    torch.manual_seed(0)
    model = build_model("preact_resnet56", 10)  # layer3: 8 partitionable blocks
    d = ResidualDecomposition(model, S)
    x = torch.randn(8, 3, 32, 32)
    total = train_flops(model, x)
    block = model.layer3[1]
    block_input = torch.randn(8, 64, 8, 8, requires_grad=True)
    per_block = train_flops(block, block_input)
    a = d.assignment(0)
    for s in range(S):
        sub = d.build_subnet(s)
        load_subnet(sub, state_tensors(model), d.pieces(a, s))
        k = len(a.units[s]["layer3"])
        expected = (total - (8 - k) * per_block) / total
        measured = train_flops(sub, x) / total
        assert measured == pytest.approx(expected, rel=0.05), (s, measured, expected)
        assert measured < 1.0


@pytest.mark.parametrize("S", [2, 4])
def test_ist_subnet_flops_share(S):
    model = MLP(784, [1024, 1024], 10)
    d = MLPDecomposition(model, S)
    x = torch.randn(32, 784)
    dims = [(784, 1024), (1024, 1024), (1024, 10)]
    cut = [(784, 1024 // S), (1024 // S, 1024 // S), (1024 // S, 10)]
    # matmul cost per layer: forward + weight grad, + input grad except the first layer
    cost = lambda layers: sum(i * o * (2 if n == 0 else 3) for n, (i, o) in enumerate(layers))  # noqa: E731
    expected = cost(cut) / cost(dims)
    sub = d.build_subnet(0)
    load_subnet(sub, state_tensors(model), d.pieces(d.assignment(0), 0))
    measured = train_flops(sub, x) / train_flops(model, x)
    assert measured == pytest.approx(expected, rel=0.05)
    assert measured < 1.3 / S
