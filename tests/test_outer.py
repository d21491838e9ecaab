"""The outer optimizer of a round (issue 17; ist_accel.outer): the holders' contributions,
averaged, are torch.optim.SGD's step on the averaged pseudo-gradient; bad settings are refused
naming the value."""

import argparse
import math

import pytest
import torch

from ist_accel import ISTConfig
from ist_accel.outer import OuterSGD
from ist_accel.recipe import add_training_args, check_args


@pytest.mark.parametrize("lr,momentum,nesterov", [(0.7, 0.9, True), (0.5, 0.5, False), (0.8, 0.0, False)])
@pytest.mark.parametrize("holders", [1, 3])
def test_averaged_contributions_are_torch_sgd_on_the_pseudo_gradient(lr, momentum, nesterov, holders):
    g = torch.Generator().manual_seed(0)
    before = torch.randn(50, generator=g, dtype=torch.float64)
    outer = OuterSGD(lr, momentum, nesterov)
    p = before.clone().requires_grad_(True)
    sgd = torch.optim.SGD([p], lr=lr, momentum=momentum, nesterov=nesterov)
    m = torch.zeros_like(before)
    x = before.clone()
    for _ in range(3):  # three rounds: the momentum carries from one to the next
        afters = [x + 0.1 * torch.randn(50, generator=g, dtype=torch.float64) for _ in range(holders)]
        # torch: one step from x over the pseudo-gradient x - mean(after)
        with torch.no_grad():
            p.copy_(x)
        p.grad = x - torch.stack(afters).mean(0)
        sgd.step()
        # ours: each holder's contribution, then the exchange's plain average
        zs, ws = [], []
        for after in afters:
            z = after.clone()
            w = outer.contribute(z, x, m)
            zs.append(z)
            ws.append(w)
        x = torch.stack(zs).mean(0)
        torch.testing.assert_close(x, p.detach(), rtol=0, atol=1e-12)
        if momentum:
            m = torch.stack(ws).mean(0)
            torch.testing.assert_close(m, sgd.state[p]["momentum_buffer"], rtol=0, atol=1e-12)
        else:
            assert all(w is None for w in ws)


def test_the_default_is_plain_averaging():
    outer = ISTConfig().outer()
    assert outer.is_plain_average and not outer.has_momentum
    assert not ISTConfig(outer_lr=0.7).outer().is_plain_average


@pytest.mark.parametrize("kwargs,message", [
    ({"outer_lr": 0}, r"outer_lr must be a finite number > 0 \(1.0: plain averaging\), got 0"),
    ({"outer_lr": -1.0}, "outer_lr must be a finite number > 0"),
    ({"outer_lr": math.nan}, "got nan"),
    ({"outer_lr": math.inf}, "got inf"),
    ({"outer_lr": True}, "got True"),
    ({"outer_momentum": 1.0}, r"outer_momentum must be a number in \[0, 1\) \(0: none\), got 1.0"),
    ({"outer_momentum": -0.1}, "got -0.1"),
    ({"outer_nesterov": 1}, "outer_nesterov must be True or False, got 1"),
    ({"outer_nesterov": True}, r"outer_nesterov=True needs outer_momentum > 0 \(DiLoCo: 0.9\)"),
])
def test_bad_outer_settings_are_refused_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ISTConfig(**kwargs)


@pytest.mark.parametrize("argv,message", [
    (["--outer-lr", "0"], "--outer-lr must be a finite number > 0, got 0.0"),
    (["--outer-lr", "nan"], "--outer-lr must be a finite number > 0, got nan"),
    (["--outer-momentum", "1"], r"--outer-momentum must be a finite number in \[0, 1\), got 1.0"),
    (["--outer-nesterov"], r"--outer-nesterov needs --outer-momentum > 0 \(DiLoCo: 0.9\)"),
    (["--method", "ddp", "--outer-lr", "0.7"], "need --method ist or diloco, got --method ddp"),
])
def test_bad_outer_flags_stop_the_recipe_before_anything_starts(argv, message, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = add_training_args(argparse.ArgumentParser()).parse_args(
        [*argv, "--num-subnets", "2", "--output-dir", str(tmp_path / "never")])
    with pytest.raises(SystemExit, match=message):
        check_args(args)
    assert not (tmp_path / "never").exists()
