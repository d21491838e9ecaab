"""IST decomposition over MLP hidden neurons (arXiv 1910.02120, Sec. 3)."""

import pytest
import torch
from torch import nn

from ist_accel.config import ISTConfig
from ist_accel.decompositions import MLPDecomposition, decompose, load_subnet, split_neurons, state_tensors
from ist_accel.models import MLP


def _mlp(norm=None, hidden=(16, 12)):
    torch.manual_seed(0)
    return MLP(10, list(hidden), 3, norm=norm, dropout=0.1)


def test_split_is_a_fresh_disjoint_cover_each_round():
    a = split_neurons(12, 3, seed=1, round_=0, group="h")
    assert sorted(i for part in a for i in part) == list(range(12))
    assert all(len(p) == 4 for p in a)
    assert a == split_neurons(12, 3, seed=1, round_=0, group="h")
    assert a != split_neurons(12, 3, seed=1, round_=1, group="h")


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_subnet_shapes_cut_hidden_dims_only(norm):
    model = _mlp(norm)
    d = MLPDecomposition(model, 4)
    assert list(d.groups.values()) == [16, 12]
    sub = d.build_subnet(0)
    linears = [m for m in sub.modules() if isinstance(m, nn.Linear)]
    assert [tuple(l.weight.shape) for l in linears] == [(4, 10), (3, 4), (3, 3)]  # in/out never split
    load_subnet(sub, state_tensors(model), d.pieces(d.assignment(0), 0))
    assert sub(torch.randn(5, 10)).shape == (5, 3)


@pytest.mark.parametrize("norm", [None, "batch"])
def test_subnet_is_the_global_mlp_restricted_to_its_neurons(norm):
    """With the other neurons' outputs zeroed, the global model computes the subnet."""
    model = _mlp(norm).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    d = MLPDecomposition(model, 2, seed=4)
    a = d.assignment(3)
    x = torch.randn(7, 10)
    for s in range(2):
        sub = d.build_subnet(s).eval()
        load_subnet(sub, state_tensors(model), d.pieces(a, s))
        handles = []
        for prev, nxt in zip(d.linears, d.linears[1:]):
            keep = torch.zeros(model.get_submodule(prev).out_features, dtype=torch.bool)
            keep[list(a.units[s][prev])] = True
            handles.append(model.get_submodule(nxt).register_forward_pre_hook(lambda m, i, k=keep: (i[0] * k,)))
        with torch.no_grad():
            torch.testing.assert_close(sub(x), model(x))
        for h in handles:
            h.remove()


def test_middle_layer_piece_is_the_diagonal_block():
    model = _mlp()
    d = MLPDecomposition(model, 2)
    a = d.assignment(0)
    pieces = {p.global_name: p for p in d.pieces(a, 1)}
    mid = pieces[f"{d.linears[1]}.weight"]
    rows, cols = mid.index
    assert rows.tolist() == list(a.units[1][d.linears[1]]) and cols.tolist() == list(a.units[1][d.linears[0]])
    w = model.get_submodule(d.linears[1]).weight
    torch.testing.assert_close(mid.gather(w), w[rows][:, cols])


def test_width_not_splittable_is_rejected():
    with pytest.raises(ValueError, match="width 16, not divisible by num_subnets=3.*num_subnets in \\[1, 2, 4, 8, 16\\]"):
        MLPDecomposition(_mlp(), 3)


def test_non_mlp_is_rejected_with_a_pointer_to_resist():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="Conv2d.*decomposition='resist'"):
        MLPDecomposition(net, 2, example_input=torch.randn(2, 1, 28, 28))


def test_auto_picks_ist_for_mlps_and_eval_view_scales_cut_inputs():
    model = _mlp(hidden=(8,))
    d = decompose(model, ISTConfig(num_subnets=2))
    assert isinstance(d, MLPDecomposition)
    x = torch.randn(4, 10)
    model.eval()
    with torch.no_grad():
        first = model.get_submodule(d.linears[0])
        last = model.get_submodule(d.linears[1])
        expected = last(0.5 * torch.relu(first(x)))
        with d.eval_view() as view:
            torch.testing.assert_close(view(x), expected)
