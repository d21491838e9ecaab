"""ISTAccelerator: an ordinary Accelerate loop (accumulation, clipping, scheduler, eval)
becomes IST and matches the single-process reference computed by hand."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from common import batch_for, eval_items, loss_fn, make_model  # noqa: E402
from launch import torchrun  # noqa: E402

from ist_accel import ISTConfig, decompose  # noqa: E402
from ist_accel.reference import ReferenceIST  # noqa: E402

ROUNDS, LOCAL_STEPS, ACCUM = 3, 2, 2


def reference(name, S, G, policy):
    """The same rounds by hand: each optimizer step sums ACCUM micro-batch losses / ACCUM,
    clips the (group-averaged) gradient to norm 1, and the lr halves every round."""
    torch.set_num_threads(1)
    model = make_model(name)
    config = ISTConfig(num_subnets=S, group_size=G, local_steps=LOCAL_STEPS, optimizer_state=policy, seed=5)
    ref = ReferenceIST(decompose(model, config), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), policy)
    for opt, subnet in zip(ref.optimizers, ref.subnets):
        opt.register_step_pre_hook(lambda o, a, k, subnet=subnet: [torch.nn.utils.clip_grad_norm_(subnet.parameters(), 1.0), None][1])

    def accumulated(model, micro_batches):
        return sum(loss_fn(model, b) for b in micro_batches) / len(micro_batches)

    for r in range(ROUNDS):
        for opt in ref.optimizers:
            opt.param_groups[0]["lr"] = 0.01 * 0.5**r
        steps = range(r * LOCAL_STEPS, (r + 1) * LOCAL_STEPS)
        batches = [[[[batch_for(name, s, g, t * ACCUM + k) for k in range(ACCUM)] for t in steps]
                     for g in range(G)] for s in range(S)]
        ref.run_round(batches, accumulated)
    with ref.decomposition.eval_view(model) as view, torch.no_grad():
        logits = view.eval()(torch.stack([x for x, _ in eval_items(name)]))
    return model, logits


CASES = [("resnet", 2, 1, "reset"), ("mlp", 2, 1, "carry"), ("resnet", 2, 2, "carry")]


@pytest.mark.parametrize("name,S,G,policy", CASES, ids=[f"{m}-S{s}xG{g}-{p}" for m, s, g, p in CASES])
def test_accelerate_loop_matches_reference(tmp_path, name, S, G, policy):
    proc = torchrun("accel_worker.py", S * G, ["--model", name, "--num-subnets", str(S), "--group-size", str(G),
                                              "--policy", policy, "--rounds", str(ROUNDS), "--local-steps",
                                              str(LOCAL_STEPS), "--accum", str(ACCUM), "--out", str(tmp_path)],
                    env={"HF_HUB_OFFLINE": "1"})
    ranks = [tmp_path / f"rank{r}.json" for r in range(S * G)]
    assert all(p.exists() for p in ranks) and (tmp_path / "global.pt").exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    got = torch.load(tmp_path / "global.pt")
    expected, expected_logits = reference(name, S, G, policy)
    for key, value in expected.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(got["global"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    torch.testing.assert_close(got["logits"], expected_logits, rtol=1e-5, atol=1e-5)
    for key, value in got["before"].items():  # model.eval() / .train() left the global model as it was
        torch.testing.assert_close(got["global"][key], value, rtol=0, atol=0)
    for r in map(json.loads, (p.read_text() for p in ranks)):
        # accumulation counts optimizer steps: ROUNDS rounds of LOCAL_STEPS steps, not micro-batches
        assert (r["rounds"], r["steps"]) == (ROUNDS, ROUNDS * LOCAL_STEPS)
        assert r["lrs"] == pytest.approx([0.01 * 0.5 ** ((t + 1) // LOCAL_STEPS) for t in range(ROUNDS * LOCAL_STEPS)])
