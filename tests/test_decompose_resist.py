"""ResIST decomposition: structural detection, sampling, subnet semantics, eval view."""

import copy

import pytest
import torch
from torch import nn

from ist_accel.config import ISTConfig
from ist_accel.decompositions import (
    ResidualDecomposition, decompose, deal_blocks, find_residual_stages, load_subnet, state_tensors,
)
from ist_accel.models import TORCHVISION_NAMES, build_model


def _needs_vision_package(name: str) -> None:
    """Skip only a test of a torchvision or timm model when that package is missing (both
    come with the [vision] extra); the project's own ResNets never skip."""
    if name.startswith("timm:"):
        pytest.importorskip("timm", reason="timm is part of the [vision] extra")
    elif name in TORCHVISION_NAMES:
        pytest.importorskip("torchvision", reason="torchvision is part of the [vision] extra")

# (model name, stem, expected default stage, expected partitionable blocks)
ZOO = [
    ("preact_resnet18", "cifar", "layer4", 1),
    ("preact_resnet34", "imagenet", "layer3", 5),
    ("preact_resnet50", "cifar", "layer3", 5),
    ("preact_resnet101", "cifar", "layer3", 22),
    ("preact_resnet152", "imagenet", "layer3", 35),
    ("preact_resnet20", None, "layer3", 2),
    ("preact_resnet32", None, "layer3", 4),
    ("preact_resnet56", None, "layer3", 8),
    ("preact_resnet110", None, "layer3", 17),
    ("resnet18", None, "layer4", 1),
    ("resnet34", None, "layer3", 5),
    ("resnet50", None, "layer3", 5),
    ("resnet101", None, "layer3", 22),
    ("resnet152", None, "layer3", 35),
    ("wide_resnet50_2", None, "layer3", 5),
    ("timm:resnet18", None, "layer4", 1),
    ("timm:resnet50", None, "layer3", 5),
    ("timm:resnet101", None, "layer3", 22),
]


def _build(name, stem):
    _needs_vision_package(name)
    return build_model(name, 10, **({"stem": stem} if stem else {}))


def _skip_unheld(model, d, assignment, s):
    """The global model with the blocks subnet ``s`` does not hold replaced by identity."""
    ref = copy.deepcopy(model)
    for st in d.stages:
        container = ref.get_submodule(st.path)
        for rel in range(st.num_blocks):
            if rel not in assignment.units[s][st.path]:
                container[st.start + rel] = nn.Identity()
    return ref


@pytest.mark.parametrize("name,stem,stage,blocks", ZOO, ids=[z[0] for z in ZOO])
def test_default_stage_detected_and_subnet_is_the_global_model_without_unheld_blocks(name, stem, stage, blocks):
    torch.manual_seed(0)
    model = _build(name, stem)
    S = 2 if blocks >= 2 else 1
    d = ResidualDecomposition(model, S, seed=3)
    assert [(s.path, s.num_blocks) for s in d.stages] == [(stage, blocks)]
    assert d.stages[0].start == 1  # the paper: the first (strided) block is shared
    a = d.assignment(5)
    x = torch.randn(2, 3, 32, 32)
    for s in range(S):
        sub = d.build_subnet(s)
        load_subnet(sub, state_tensors(model), d.pieces(a, s))
        ref = _skip_unheld(model, d, a, s)
        sub.eval(), ref.eval()
        with torch.no_grad():
            torch.testing.assert_close(sub(x), ref(x), rtol=1e-5, atol=1e-5)
        # physically small: exactly the held blocks' tensors are there
        n_sub = sum(p.numel() for p in sub.parameters())
        block = sum(p.numel() for p in model.get_submodule(f"{stage}.1").parameters())
        total = sum(p.numel() for p in model.parameters())
        assert n_sub == total - (blocks - len(a.units[s][stage])) * block


def test_all_stages_and_explicit_override():
    model = build_model("preact_resnet20", 10)
    d = ResidualDecomposition(model, 2, stages="all")
    assert [(s.path, s.start, s.stop) for s in d.stages] == [("layer1", 1, 3), ("layer2", 1, 3), ("layer3", 1, 3)]
    d = ResidualDecomposition(model, 2, stages="layer1:0-2,layer3")
    assert [(s.path, s.start, s.stop) for s in d.stages] == [("layer1", 0, 3), ("layer3", 1, 3)]
    a = d.assignment(0)
    x = torch.randn(2, 3, 32, 32)
    sub = d.build_subnet(1)
    load_subnet(sub, state_tensors(model), d.pieces(a, 1))
    ref = _skip_unheld(model, d, a, 1)
    sub.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(sub(x), ref(x))


def test_bad_stage_overrides_name_what_is_partitionable():
    model = build_model("preact_resnet20", 10)
    with pytest.raises(ValueError, match=r"blocks 0-2 of stage .layer2.*layer2:1-2"):  # block 0 is strided
        ResidualDecomposition(model, 2, stages="layer2:0-2")
    with pytest.raises(ValueError, match="'fc'.*available"):
        ResidualDecomposition(model, 2, stages="fc")
    with pytest.raises(ValueError, match="bad stage spec"):
        ResidualDecomposition(model, 2, stages="layer3:x")


def test_no_partitionable_stack_error_says_what_is_supported():
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with pytest.raises(ValueError, match="no partitionable residual stack.*stages=.*ist_mlp"):
        ResidualDecomposition(plain, 2)


def test_too_many_subnets_and_too_deep_minimum_are_rejected():
    model = build_model("preact_resnet32", 10)  # layer3: 4 partitionable blocks
    with pytest.raises(ValueError, match="num_subnets=5 exceeds the 4 partitionable blocks.*min_blocks >= 1"):
        ResidualDecomposition(model, 5)
    with pytest.raises(ValueError, match="min_blocks=5 exceeds the 4 partitionable blocks"):
        ResidualDecomposition(model, 2, min_blocks=5)
    ResidualDecomposition(model, 5, min_blocks=1)  # overlap allowed with a minimum depth


@pytest.mark.parametrize("n,S,m", [(22, 4, 0), (22, 8, 0), (22, 2, 0), (5, 2, 4), (4, 2, 3), (6, 4, 2), (3, 3, 3)])
def test_round_robin_deal_with_minimum_depth(n, S, m):
    a = deal_blocks(n, S, m, seed=7, round_=11, group="g")
    assert a == deal_blocks(n, S, m, seed=7, round_=11, group="g")  # pure function of (seed, round)
    assert a != deal_blocks(n, S, m, seed=7, round_=12, group="g") or n == S == m
    base, extra = divmod(n, S)
    assert [len(b) for b in a] == [max(base + (s < extra), m) for s in range(S)]
    assert all(len(set(b)) == len(b) and list(b) == sorted(b) for b in a)  # no repeat inside a subnet
    assert set().union(*a) == set(range(n))  # every block is trained
    if S * m <= n:
        assert sum(len(b) for b in a) == n  # disjoint when no minimum forces overlap


def test_assignment_is_the_same_in_every_process():
    """Ranks derive the assignment without communicating: same seed and round, same
    result in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "from ist_accel.models import build_model; from ist_accel.decompositions import ResidualDecomposition;"
        "d=ResidualDecomposition(build_model('preact_resnet56',10),4,seed=9); print(d.assignment(3).digest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]
    d = ResidualDecomposition(build_model("preact_resnet56", 10), 4, seed=9)
    assert out == d.assignment(3).digest() != d.assignment(4).digest()


def test_eval_view_scales_partitioned_residual_branches_only_during_eval():
    torch.manual_seed(0)
    model = build_model("preact_resnet32", 10)
    d = ResidualDecomposition(model, 4, min_blocks=2)  # scale = max(1/4, 2/4) = 0.5
    assert d.eval_scale(d.stages[0]) == 0.5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    manual = copy.deepcopy(model).eval()
    for pos in range(d.stages[0].start, d.stages[0].stop):
        manual.get_submodule(f"layer3.{pos}.{d.stages[0].branch}").weight.data.mul_(0.5)  # conv: linear in weight
    x = torch.randn(3, 3, 32, 32)
    model.train()
    with d.eval_view() as view, torch.no_grad():
        assert not view.training
        torch.testing.assert_close(view(x), manual(x))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"eval view changed {k}"
    with torch.no_grad():  # hooks removed afterwards
        model.eval()
        assert not torch.allclose(model(x), manual(x))


def test_eval_scaling_on_post_activation_torchvision_blocks():
    torchvision = pytest.importorskip("torchvision", reason="torchvision is part of the [vision] extra")
    model = torchvision.models.resnet50(num_classes=10).eval()
    d = ResidualDecomposition(model, 5)
    assert d.stages[0].branch == "bn3"
    x = torch.randn(2, 3, 32, 32)
    manual = copy.deepcopy(model)
    for pos in range(1, 6):
        bn = manual.layer3[pos].bn3
        bn.weight.data.mul_(0.2), bn.bias.data.mul_(0.2)  # BN affine output scales with both
    with d.eval_view() as view, torch.no_grad():
        torch.testing.assert_close(view(x), manual(x))


def test_auto_decomposition_picks_resist_for_resnets():
    d = decompose(build_model("preact_resnet20", 10), ISTConfig(num_subnets=2))
    assert isinstance(d, ResidualDecomposition)
    assert {s.path for s in find_residual_stages(build_model("preact_resnet20", 10))} == {"layer1", "layer2", "layer3"}
