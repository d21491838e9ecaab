"""Assignment policies (issue 35): ``"rotate"`` draws a split every S rounds and moves each
part on by one subnet per round, so every unit meets every subnet (node) once per cycle;
``"random"`` is the papers' fresh draw each round."""

import pytest

from ist_accel import ISTConfig, decompose
from ist_accel.models import MLP, build_model


def units_of(assignment, group):
    return [set(u[group]) for u in assignment.units]


def test_rotate_moves_each_part_on_by_one_subnet_and_redraws_every_cycle():
    S = 4
    d = decompose(MLP(12, [16, 16], 3), ISTConfig(num_subnets=S, assignment="rotate", seed=3))
    plain = decompose(MLP(12, [16, 16], 3), ISTConfig(num_subnets=S, seed=3))
    groups = list(d.groups)
    assert d.assignment(0).units == plain.assignment(0).units  # round 0 is the papers' draw
    for cycle in range(3):
        first = d.assignment(cycle * S)
        for r in range(cycle * S, (cycle + 1) * S):
            a = d.assignment(r)
            assert a.round == r
            for g in groups:
                parts = units_of(a, g)
                assert set().union(*parts) == set(range(d.groups[g])) and sum(map(len, parts)) == d.groups[g]
                assert parts == [set(first.units[(s + r) % S][g]) for s in range(S)]
        for g in groups:  # within a cycle every unit is in every subnet exactly once
            for s in range(S):
                seen = [u for r in range(cycle * S, (cycle + 1) * S) for u in d.assignment(r).units[s][g]]
                assert sorted(seen) == list(range(d.groups[g]))
    assert d.assignment(S).units != d.assignment(0).units  # a fresh split each cycle
    assert d.assignment(5).units == decompose(MLP(12, [16, 16], 3), ISTConfig(
        num_subnets=S, assignment="rotate", seed=3)).assignment(5).units  # a pure function of (seed, round)


def test_random_is_the_draw_and_bad_values_are_refused():
    d = decompose(MLP(12, [16, 16], 3), ISTConfig(num_subnets=2, seed=1))
    assert all(d.assignment(r).units == d.draw(r).units for r in range(4))
    with pytest.raises(ValueError, match="assignment must be one of random, rotate; got 'cyclic'"):
        ISTConfig(assignment="cyclic")


def test_rotate_needs_as_many_units_in_every_subnet():
    model = build_model("preact_resnet32", num_classes=4)  # layer3: 4 partitioned blocks
    decompose(model, ISTConfig(num_subnets=2, assignment="rotate"))  # 2 + 2: fine
    with pytest.raises(ValueError, match=r"assignment='rotate' .* 'layer3' gives \[2, 1, 1\] per subnet"):
        decompose(model, ISTConfig(num_subnets=3, assignment="rotate"))
