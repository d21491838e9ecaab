"""DeepSpeed ZeRO inside each subnet group, IST across the groups: S=2 x G=2 on four CPU
processes (DeepSpeed's CPU accelerator, gloo), ZeRO-1/2/3 under both optimizer-state
policies. After 3 rounds the global model equals the single-process reference, and each
rank holds only its group's partition of the optimizer state."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from launch import ROOT, accelerate_launch, torchrun  # noqa: E402

from ist_accel.sharded import load_folder  # noqa: E402
from test_recipes import MNIST, RECIPES, launch, needs_mnist  # noqa: E402
from test_accelerate import ACCUM, LOCAL_STEPS, ROUNDS, exported, reference  # noqa: E402

from ist_accel import ISTConfig  # noqa: E402
from ist_accel.zero import check_deepspeed_config  # noqa: E402

S, G = 2, 2


# ZeRO-1 and ZeRO-2 share DeepSpeed's optimizer class and ZeroSubnet's code path, so one
# policy each covers them; ZeRO-3 (its own optimizer and partitioned parameters) runs both.
CASES = [(1, "reset"), (2, "carry"), (3, "reset"), (3, "carry"), (2, "carry-diloco")]  # + DiLoCo's outer step


@pytest.mark.slow
@pytest.mark.parametrize("stage,policy", CASES, ids=[f"zero{s}-{p}" for s, p in CASES])
def test_zero_inside_groups_matches_reference(tmp_path, deepspeed_cpu_comm_op, stage, policy):
    proc = torchrun("accel_worker.py", S * G, ["--model", "mlp", "--num-subnets", str(S), "--group-size", str(G),
                                              "--policy", policy, "--rounds", str(ROUNDS), "--local-steps",
                                              str(LOCAL_STEPS), "--accum", str(ACCUM), "--zero-stage", str(stage),
                                              "--out", str(tmp_path)], timeout=600, env={"HF_HUB_OFFLINE": "1"})
    ranks = [tmp_path / f"rank{r}.json" for r in range(S * G)]
    assert all(p.exists() for p in ranks) and (tmp_path / "global.pt").exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    got = torch.load(tmp_path / "global.pt")
    expected, expected_logits = reference("mlp", S, G, policy)
    for key, value in exported(expected, S, G).items():  # get_state_dict exports the evaluated model
        if value.is_floating_point():
            torch.testing.assert_close(got["global"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    torch.testing.assert_close(got["logits"], expected_logits, rtol=1e-5, atol=1e-5)
    for r in map(json.loads, (p.read_text() for p in ranks)):
        assert (r["zero_stage"], r["dp_world_size"]) == (stage, G)  # ZeRO spans the group, not the world
        assert (r["rounds"], r["steps"]) == (ROUNDS, ROUNDS * LOCAL_STEPS)
        assert r["state_keys"] == ["momentum_buffer"]
        # this rank's partition: about subnet / G elements per state entry (plus alignment padding)
        share = r["subnet_numel"] / G
        assert share <= r["optimizer_state_elements"] <= share + 16, r


@pytest.mark.parametrize("config,match", [
    ({"zero_optimization": {"stage": 0}}, "ZeRO stage 1, 2 or 3 inside each group"),
    ({"zero_optimization": {"stage": 2}, "pipeline": {"stages": 2}}, "pipeline parallelism cannot be combined"),
    ({"zero_optimization": {"stage": 2}, "tensor_parallel": {"autotp_size": 2}}, "autotp_size=2"),
    ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 4}}, "would make ZeRO groups span subnets"),
    ({"zero_optimization": {"stage": 3, "mics_shard_size": 3}}, "mics_shard_size=3"),
    ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, "use bf16"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, "remove the 'optimizer' block"),
    ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, "remove the 'scheduler' block"),
])
def test_unworkable_deepspeed_configs_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        check_deepspeed_config(config, group_size=2)


def test_bad_deepspeed_setup_fails_before_any_process_group(monkeypatch):
    import torch.distributed as dist
    from accelerate.utils import DeepSpeedPlugin

    from ist_accel import ISTAccelerator

    monkeypatch.setenv("WORLD_SIZE", "4")
    plugin = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 4}})
    with pytest.raises(ValueError, match="zero_hpz_partition_size=4 would make ZeRO groups span subnets"):
        ISTAccelerator(ISTConfig(num_subnets=2, group_size=2), deepspeed_plugin=plugin)
    plugin = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match="fp16 with DeepSpeed skips optimizer steps"):
        ISTAccelerator(ISTConfig(num_subnets=2, group_size=2), deepspeed_plugin=plugin, mixed_precision="fp16")
    with pytest.raises(ValueError, match="dense_warmup_steps is not supported under DeepSpeed"):
        ISTAccelerator(ISTConfig(num_subnets=2, group_size=2), deepspeed_plugin=plugin, dense_warmup_steps=2)
    with pytest.raises(ValueError, match="optimizer_state='local' is not supported under DeepSpeed"):
        ISTAccelerator(ISTConfig(num_subnets=2, group_size=2, optimizer_state="local"), deepspeed_plugin=plugin)
    assert not dist.is_initialized()


@pytest.mark.long
@pytest.mark.slow
@needs_mnist
def test_recipe_under_the_deepspeed_launch_config_resumes_exactly(tmp_path, deepspeed_cpu_comm_op):
    """launch_configs/deepspeed_zero2.yaml as shipped (4 processes: S=2 groups x G=2, ZeRO-2
    in each): ist_mlp trains, checkpoints every 2 rounds, and a run stopped mid-round at step
    25 resumes from step 20 to the uninterrupted run's parameters (optimizer state carried)."""
    config = ROOT / "launch_configs" / "deepspeed_zero2.yaml"
    common = ["--data", str(MNIST), "--hidden", "64", "64", "--num-subnets", "2", "--group-size", "2",
              "--max-steps", "40", "--local-steps", "10", "--checkpoint-every", "20", "--eval-every", "20",
              "--optimizer-state", "carry"]
    whole = launch("ist_mlp.py", common, tmp_path / "whole", nproc=4, config=config, real=True)  # the command itself
    assert (whole["steps"], whole["rounds"], whole["world_size"]) == (40, 4, 4)
    assert whole["final_accuracy"] > 0.5 and whole["bytes_sent_per_worker"] <= 1.10 * whole["bytes_lower_per_worker"]
    proc = accelerate_launch(RECIPES / "ist_mlp.py", 4, [*common, "--output-dir", str(tmp_path / "cut"),
                                                        "--stop-after-steps", "25"], config=config)
    assert not (tmp_path / "cut" / "results.json").exists(), proc.stderr[-3000:]
    resumed = launch("ist_mlp.py", [*common, "--resume", "auto"], tmp_path / "cut", nproc=4, config=config)
    a = load_folder(tmp_path / "whole" / "model")
    b = load_folder(tmp_path / "cut" / "model")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-6, msg=lambda m: f"{key}: {m}")
    assert (resumed["steps"], resumed["final_accuracy"]) == (whole["steps"], whole["final_accuracy"])
