"""Ranks out of step or with another model are told so by name, never by a gloo abort; a
round ended early is synced; a read of the global model mid-round is the model a sync now
would produce; frozen parameters stay frozen. One launch of 2 gloo ranks runs every drill
(tests/workers/agreement_worker.py) and each is checked against a hand-run reference."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from agreement_worker import mlp  # noqa: E402
from common import batch_for, eval_items, loss_fn, score  # noqa: E402
from launch import torchrun  # noqa: E402

from ist_accel import ISTConfig, decompose  # noqa: E402
from ist_accel.reference import ReferenceIST  # noqa: E402


@pytest.fixture(scope="module")
def drills(tmp_path_factory):
    out = tmp_path_factory.mktemp("agreement")
    proc = torchrun("agreement_worker.py", 2, ["--out", str(out)], timeout=300)
    ranks = [out / f"rank{r}.json" for r in range(2)]
    assert all(p.exists() for p in ranks), proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, [json.loads(p.read_text()) for p in ranks]


def reference(steps_per_round: list[int], frozen: bool = False):
    torch.set_num_threads(1)
    model = mlp(frozen=frozen)
    ref = ReferenceIST(decompose(model, ISTConfig(num_subnets=2, seed=5)),
                       lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
    t = 0
    for k in steps_per_round:
        ref.run_round([[[batch_for("mlp", s, 0, t + i) for i in range(k)]] for s in range(2)], loss_fn)
        t += k
    return model, ref.decomposition


def accuracy(model, decomposition):
    items = eval_items("mlp")
    with decomposition.eval_view(model) as view, torch.no_grad():
        correct, count = score(view, (torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])))
    return correct / count


def close(got: dict, expected: torch.nn.Module) -> None:
    for name, value in expected.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_ranks_out_of_step_are_refused_at_a_read_and_at_a_sync(drills):
    _, ranks = drills
    for r in ranks:
        assert "ranks disagree on the step" in r["steps_apart_read"], r  # 5 vs 6 steps, then evaluate()
        assert "ranks disagree on the step" in r["seven_vs_ten"], r  # finish() at 7 meets the sync at 10
        assert "others range 7..10" in r["seven_vs_ten"]


def test_another_model_on_one_rank_is_refused_at_set_up(drills):
    _, ranks = drills
    for r in ranks:
        assert "ranks disagree on the model" in r["other_width"], r


def test_a_round_ended_early_is_synced_and_a_mid_round_read_is_what_a_sync_gives(drills):
    out, ranks = drills
    expected, d = reference([4, 2])  # rounds of 4 steps; finish() after 6 syncs the last 2
    for r in ranks:
        assert r["finish"] and r["after_finish"] == [2, 6, 0]
        assert r["mid_round_accuracy"] == pytest.approx(accuracy(expected, d), abs=1e-9)
        assert r["finished_accuracy"] == pytest.approx(r["mid_round_accuracy"], abs=1e-9)
    close(torch.load(out / "mid_round.pt"), expected)
    close(torch.load(out / "partial.pt"), expected)


def test_frozen_parameters_stay_frozen_under_ist(drills):
    out, ranks = drills
    assert all(r["frozen_requires_grad"] == ["1.weight"] for r in ranks)
    got = torch.load(out / "frozen.pt")
    assert torch.equal(got["1.weight"], mlp(frozen=True)[1].weight.detach())
    expected, _ = reference([2, 2, 2], frozen=True)
    close(got, expected)
