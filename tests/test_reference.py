"""The single-process reference round: averaging over holders, buffers, optimizer state.

Expected values below are worked out by hand (see each test's comments)."""

import copy

import pytest
import torch
from torch import nn

from ist_accel.decompositions import MLPDecomposition, Piece, ResidualDecomposition, average_into_global, kept_tensors
from ist_accel.models import MLP, build_model
from ist_accel.reference import ReferenceIST, load_optimizer_state


def test_average_over_holders_by_hand():
    g = {"v": torch.tensor([1.0, 2.0, 3.0, 4.0]), "w": torch.zeros(2, 3)}
    idx = lambda *i: torch.tensor(i)  # noqa: E731
    contributions = [
        ([Piece("a", "v", (idx(0, 1),)), Piece("m", "w", (idx(0), idx(0, 2)))],
         {"a": torch.tensor([10.0, 20.0]), "m": torch.tensor([[1.0, 2.0]])}),
        ([Piece("b", "v", (idx(1, 2),)), Piece("m", "w")],
         {"b": torch.tensor([30.0, 40.0]), "m": torch.full((2, 3), 5.0)}),
    ]
    average_into_global(g, contributions)
    # v: element 0 only subnet 0 (copy), 1 both ((20+30)/2), 2 only subnet 1, 3 nobody (kept)
    assert g["v"].tolist() == [10.0, 25.0, 40.0, 4.0]
    # w: (0,0) and (0,2) held twice: (1+5)/2 and (2+5)/2; the rest once (5)
    assert g["w"].tolist() == [[3.0, 5.0, 3.5], [5.0, 5.0, 5.0]]


class Scale(nn.Module):
    """A scalar residual block: y = x + w x."""

    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(1, 1, bias=False)
        self.lin.weight.data.fill_(w)

    def forward(self, x):
        return x + self.lin(x)


def _scalar_resnet():
    stem = nn.Linear(1, 1, bias=False)
    stem.weight.data.fill_(1.0)
    return nn.Sequential(stem, Scale(0.5), Scale(0.25))


def _loss(model, batch):
    return model(batch).sum()


def _sgd(params, momentum=0.0):
    return torch.optim.SGD(params, lr=0.1, momentum=momentum)


def _values(model):
    return [model[0].weight.item(), model[1].lin.weight.item(), model[2].lin.weight.item()]


def test_disjoint_blocks_by_hand():
    # out = a x (1 + w); d/da = x (1 + w), d/dw = a x; x = 1, lr 0.1, one step.
    # subnet with w1=0.5: a -> 1 - 0.15 = 0.85,  w1 -> 0.5 - 0.1 = 0.4
    # subnet with w2=0.25: a -> 1 - 0.125 = 0.875, w2 -> 0.25 - 0.1 = 0.15
    # shared a is averaged: 0.8625; each block is copied back from its only holder.
    model = _scalar_resnet()
    ref = ReferenceIST(ResidualDecomposition(model, 2, example_input=torch.ones(1, 1)), _sgd)
    x = torch.ones(1, 1)
    ref.run_round([[[x]], [[x]]], _loss)
    assert _values(model) == pytest.approx([0.8625, 0.4, 0.15])


def test_overlapping_blocks_and_carried_momentum_by_hand():
    # min depth 2 = N: both subnets hold both blocks; out = a x (1+w1)(1+w2) = 1.875 x.
    # subnet 0 (x=1): grads a 1.875, w1 1.25, w2 1.5  -> a .8125, w1 .375, w2 .1
    # subnet 1 (x=2): grads a 3.75,  w1 2.5,  w2 3.0  -> a .625,  w1 .25,  w2 -.05
    # averages: a .71875, w1 .3125, w2 .025; momentum buffers (= first grads) averaged:
    # a 2.8125, w1 1.875, w2 2.25.
    model = _scalar_resnet()
    d = ResidualDecomposition(model, 2, min_blocks=2, example_input=torch.ones(1, 1))
    ref = ReferenceIST(d, lambda p: _sgd(p, momentum=0.9), optimizer_state="carry")
    ref.run_round([[[torch.ones(1, 1)]], [[torch.full((1, 1), 2.0)]]], _loss)
    assert _values(model) == pytest.approx([0.71875, 0.3125, 0.025])
    momentum = {n: st["momentum_buffer"].item() for n, st in ref.global_optimizer_state.items()}
    assert momentum == pytest.approx({"0.weight": 2.8125, "1.lin.weight": 1.875, "2.lin.weight": 2.25})
    # carry: a subnet starting the next round gets its units' averaged momentum
    sub, opt = ref.subnets[0], ref.optimizers[0]
    pieces = d.pieces(d.assignment(1), 0)
    load_optimizer_state(opt, sub, ref.global_optimizer_state, pieces)
    got = {n: opt.state[p]["momentum_buffer"].item() for n, p in sub.named_parameters()}
    assert got == pytest.approx({"0.weight": 2.8125, "1.lin.weight": 1.875, "2.lin.weight": 2.25})


def test_local_policy_keeps_each_subnets_own_momentum_by_hand():
    # min depth 2 = N: both subnets hold both blocks in the same slots every round, so under
    # "local" each keeps its own momentum (not averaged). Round 0 as in the test above:
    # buffers subnet 0 (x=1) a 1.875, w1 1.25, w2 1.5; subnet 1 (x=2) twice that; global
    # a .71875, w1 .3125, w2 .025. Round 1 from there, (1+w1)(1+w2) = 1.3453125:
    # subnet 0 grads a 1.3453125, w1 a(1+w2) = .73671875, w2 a(1+w1) = .943359375
    #   buffers .9 * old + grad: a 3.0328125, w1 1.86171875, w2 2.293359375
    #   values: a .41546875, w1 .126328125, w2 -.2043359375
    # subnet 1 grads twice those; buffers a 6.065625, w1 3.7234375, w2 4.58671875
    #   values: a .1121875, w1 -.05984375, w2 -.433671875
    # averages: a .263828125, w1 .0332421875, w2 -.31900390625
    model = _scalar_resnet()
    d = ResidualDecomposition(model, 2, min_blocks=2, example_input=torch.ones(1, 1))
    ref = ReferenceIST(d, lambda p: _sgd(p, momentum=0.9), optimizer_state="local")
    batches = [[[torch.ones(1, 1)]], [[torch.full((1, 1), 2.0)]]]
    ref.run_round(batches, _loss)
    assert _values(model) == pytest.approx([0.71875, 0.3125, 0.025])
    ref.run_round(batches, _loss)
    assert _values(model) == pytest.approx([0.263828125, 0.0332421875, -0.31900390625])
    buffers = [[opt.state[p]["momentum_buffer"].item() for p in sub.parameters()]
               for sub, opt in zip(ref.subnets, ref.optimizers)]
    assert buffers == [pytest.approx([3.0328125, 1.86171875, 2.293359375]),
                       pytest.approx([6.065625, 3.7234375, 4.58671875])]


def test_local_policy_keeps_state_only_for_identical_pieces():
    idx = lambda *i: torch.tensor(i)  # noqa: E731
    held = [Piece("stem", "stem"), Piece("b0", "stage.3"), Piece("b1", "stage.5"),
            Piece("h", "fc.weight", (idx(0, 2), None)), Piece("o", "out.weight", (None, idx(1, 3)))]
    following = [Piece("stem", "stem"), Piece("b0", "stage.5"), Piece("b1", "stage.6"),
                 Piece("h", "fc.weight", (idx(0, 2), None)), Piece("o", "out.weight", (None, idx(1, 2)))]
    # stem kept; block 5 moved from slot b1 to b0 (its state goes with it); block 6 is new;
    # the same neurons kept; other neurons start fresh
    assert kept_tensors(held, following) == {"stem": "stem", "b0": "b1", "h": "h"}
    assert kept_tensors([], following) == {}


def test_batchnorm_buffers_are_averaged_by_hand():
    # The first BatchNorm sees conv1's output; after one training forward its running mean
    # is 0.9 * 0 + 0.1 * batch mean, averaged over both subnets (both hold the stem).
    torch.manual_seed(0)
    model = build_model("preact_resnet20", 10)
    conv1 = copy.deepcopy(model.conv1)
    xs = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32) + 1]
    ys = [torch.randint(0, 10, (4,)) for _ in xs]
    ref = ReferenceIST(ResidualDecomposition(model, 2), _sgd)
    ref.run_round([[[(xs[0], ys[0])]], [[(xs[1], ys[1])]]],
                  lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    with torch.no_grad():
        means = [conv1(x).mean(dim=(0, 2, 3)) for x in xs]
    torch.testing.assert_close(model.layer1[0].bn1.running_mean, 0.1 * (means[0] + means[1]) / 2)


def _max_gap(a: nn.Module, b: nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def test_reset_policy_starts_each_round_with_fresh_state():
    torch.manual_seed(0)
    mk = lambda: MLP(6, [8], 2)  # noqa: E731
    data = [[[(torch.randn(5, 6), torch.randint(0, 2, (5,))) for _ in range(3)]] for _ in range(2)]
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    opt = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
    model = mk()
    start = copy.deepcopy(model)
    ref = ReferenceIST(MLPDecomposition(model, 2), opt, optimizer_state="reset")
    ref.run_round(data, loss)
    after_one = copy.deepcopy(model)
    ref.run_round(data, loss)
    # reset: round 2 is what a reference with no optimizer state makes of round 1's model
    fresh_model = copy.deepcopy(after_one)
    fresh = ReferenceIST(MLPDecomposition(fresh_model, 2), opt, optimizer_state="reset")
    fresh.round = 1
    fresh.run_round(data, loss)
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(a, b)
    # The check above has teeth only if carried state would change round 2. Carry from the
    # same start over the same two rounds: equal after round 1 (both begin with no state),
    # different after round 2 only because the averaged momentum was carried in.
    carry_model = copy.deepcopy(start)
    carried = ReferenceIST(MLPDecomposition(carry_model, 2), opt, optimizer_state="carry")
    carried.run_round(data, loss)
    for a, b in zip(carry_model.parameters(), after_one.parameters()):
        torch.testing.assert_close(a, b)
    carried.run_round(data, loss)
    assert _max_gap(carry_model, model) > 1e-3, _max_gap(carry_model, model)


def test_a_group_of_replicas_equals_one_worker_on_the_joint_batch():
    torch.manual_seed(0)
    base = MLP(6, [8, 8], 3)
    halves = [[(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(2)] for _ in range(4)]
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    groups = [[halves[0], halves[1]], [halves[2], halves[3]]]  # S=2 x G=2
    joint = [[[(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*g)]] for g in groups]
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    ReferenceIST(MLPDecomposition(m1, 2), _sgd).run_round(groups, loss)
    ReferenceIST(MLPDecomposition(m2, 2), _sgd).run_round(joint, loss)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b)
