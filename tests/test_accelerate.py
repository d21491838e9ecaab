"""ISTAccelerator: an ordinary Accelerate loop (accumulation, clipping, scheduler, eval)
becomes IST and matches the single-process reference computed by hand."""

import functools
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


def dense_warmup(model, world, steps):
    """Data-parallel steps by hand, rounded as DDP rounds: each rank's gradient (ACCUM
    micro-batches), divided by the world size, summed over ranks; clipped; SGD with momentum.
    BatchNorm statistics are rank 0's (DDP broadcasts rank 0's buffers)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    params = list(model.parameters())
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    for t in range(steps):
        start = [b.clone() for b in buffers]
        grads, kept = [], None
        for rank in range(world):
            for b, v in zip(buffers, start):
                b.copy_(v)
            optimizer.zero_grad()
            for k in range(ACCUM):
                batch = batch_for(name_of(model), rank, 0, 90 + t * ACCUM + k, next(model.parameters()).dtype)
                (loss_fn(model, batch) / ACCUM).backward()
            grads.append([p.grad / world for p in params])
            kept = kept or [b.clone() for b in buffers]  # rank 0's
        for b, v in zip(buffers, kept):
            b.copy_(v)
        for i, p in enumerate(params):
            p.grad = functools.reduce(torch.add, [g[i] for g in grads])
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


def exported(model, S, G):
    """What get_state_dict / save_model export: the global model with its evaluation view folded in."""
    return decompose(model, ISTConfig(num_subnets=S, group_size=G, local_steps=LOCAL_STEPS, seed=5)).export_state(
        model.state_dict())


def name_of(model):
    return "mlp" if isinstance(model, torch.nn.Sequential) else "resnet"


DILOCO = {"outer_lr": 0.7, "outer_momentum": 0.9, "outer_nesterov": True}


def reference(name, S, G, policy, warmup=0, bf16=False, partial=0, dtype=torch.float32):
    """The same rounds by hand: each optimizer step sums ACCUM micro-batch losses / ACCUM,
    clips the (group-averaged) gradient to norm 1, and the lr halves every LOCAL_STEPS steps."""
    torch.set_num_threads(1)
    model = make_model(name, dtype)
    if warmup:
        dense_warmup(model, S * G, warmup)
    policy, _, outer = policy.partition("-")  # "carry-diloco": DiLoCo's outer step (issue 17)
    config = ISTConfig(num_subnets=S, group_size=G, local_steps=LOCAL_STEPS, optimizer_state=policy, seed=5,
                       **(DILOCO if outer == "diloco" else {}))
    ref = ReferenceIST(decompose(model, config), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), policy,
                       outer=config.outer())
    for opt, subnet in zip(ref.optimizers, ref.subnets):
        opt.register_step_pre_hook(lambda o, a, k, subnet=subnet: [torch.nn.utils.clip_grad_norm_(subnet.parameters(), 1.0), None][1])

    def forward(model, x):  # what mixed_precision="bf16" does: the forward autocast, outputs back to fp32
        if not bf16:
            return model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()

    def accumulated(model, micro_batches):
        losses = [torch.nn.functional.cross_entropy(forward(model, x), y) for x, y in micro_batches]
        return sum(losses) / len(micro_batches)

    for r in range(ROUNDS + bool(partial)):
        for opt in ref.optimizers:
            opt.param_groups[0]["lr"] = 0.01 * 0.5 ** (r + warmup // LOCAL_STEPS)
        steps = range(r * LOCAL_STEPS, r * LOCAL_STEPS + (partial if r == ROUNDS else LOCAL_STEPS))
        batches = [[[[batch_for(name, s, g, t * ACCUM + k, dtype) for k in range(ACCUM)] for t in steps]
                     for g in range(G)] for s in range(S)]
        ref.run_round(batches, accumulated)
    with ref.decomposition.eval_view(model) as view, torch.no_grad():
        logits = forward(view.eval(), torch.stack([x for x, _ in eval_items(name, dtype)]))
    return model, logits


# (model, S, G, policy, warm-up steps, bf16, steps after the last round: end_training() syncs them)
CASES = [("resnet", 2, 1, "reset", 0, False, 0), ("mlp", 2, 1, "carry", 0, False, 1),
         ("resnet", 2, 2, "carry", 0, False, 0), ("resnet", 2, 1, "reset", 2, False, 0),
         ("mlp", 2, 2, "carry", 2, False, 0), ("resnet", 2, 1, "carry", 0, True, 0),
         ("mlp", 2, 2, "reset-diloco", 0, False, 1), ("resnet", 2, 1, "carry-diloco", 0, False, 0),
         ("resnet", 2, 2, "local", 0, False, 0)]


@pytest.mark.parametrize("name,S,G,policy,warmup,bf16,partial", CASES,
                         ids=[f"{m}-S{s}xG{g}-{p}" + (f"-warmup{w}" if w else "") + ("-bf16" if b else "")
                              + (f"-partial{k}" if k else "") for m, s, g, p, w, b, k in CASES])
def test_accelerate_loop_matches_reference(tmp_path, name, S, G, policy, warmup, bf16, partial):
    """In float64 (model, batches, fp64 wire), as tests/test_distributed.py: in fp32 an ulp of
    averaging order, amplified by ReLU/BatchNorm flips and DiLoCo's step, made the comparison
    depend on the CPU's kernels (issue 32: resnet carry-diloco failed with SSE kernels). The bf16
    case runs in fp32 under autocast, as mixed precision does, with fp32's tolerance."""
    dtype = torch.float32 if bf16 else torch.float64
    proc = torchrun("accel_worker.py", S * G, ["--model", name, "--num-subnets", str(S), "--group-size", str(G),
                                              "--policy", policy, "--rounds", str(ROUNDS), "--local-steps",
                                              str(LOCAL_STEPS), "--accum", str(ACCUM), "--warmup", str(warmup),
                                              "--mixed-precision", "bf16" if bf16 else "no", "--partial", str(partial),
                                              "--out", str(tmp_path), "--dtype", str(dtype)[6:]],
                    env={"HF_HUB_OFFLINE": "1"})
    ranks = [tmp_path / f"rank{r}.json" for r in range(S * G)]
    assert all(p.exists() for p in ranks) and (tmp_path / "global.pt").exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    got = torch.load(tmp_path / "global.pt")
    expected, expected_logits = reference(name, S, G, policy, warmup, bf16, partial, dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if bf16 else {"rtol": 1e-10, "atol": 1e-12}
    for key, value in exported(expected, S, G).items():  # get_state_dict exports the evaluated model
        if value.is_floating_point():
            torch.testing.assert_close(got["global"][key], value, **tolerance, msg=lambda m: f"{key}: {m}")
    torch.testing.assert_close(got["logits"], expected_logits, rtol=tolerance["rtol"], atol=10 * tolerance["atol"])
    for key, value in got["before"].items():  # model.eval() / .train() left the global model as it was
        torch.testing.assert_close(got["global"][key], value, rtol=0, atol=0)
    for r in map(json.loads, (p.read_text() for p in ranks)):
        # accumulation counts optimizer steps: ROUNDS rounds of LOCAL_STEPS steps, not micro-batches
        assert (r["rounds"], r["steps"]) == (ROUNDS + bool(partial), ROUNDS * LOCAL_STEPS + partial)
        steps = warmup + ROUNDS * LOCAL_STEPS + partial  # the scheduler runs on through the switch
        assert r["lrs"] == pytest.approx([0.01 * 0.5 ** ((t + 1) // LOCAL_STEPS) for t in range(steps)])


def test_bad_setups_fail_before_any_process_group(monkeypatch):
    import torch.distributed as dist

    from ist_accel import ISTAccelerator

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="world size 3 does not fit num_subnets=2 x group_size=1"):
        ISTAccelerator(ISTConfig(num_subnets=2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="dense_warmup_steps must be an integer >= 0, got -1"):
        ISTAccelerator(ISTConfig(num_subnets=2), dense_warmup_steps=-1)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="ISTAccelerator does not run under FSDP"):
        ISTAccelerator(ISTConfig(num_subnets=2))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(TypeError, match="ist_config must be an ist_accel.ISTConfig, got dict"):
        ISTAccelerator({"num_subnets": 2})
    assert not dist.is_initialized()
