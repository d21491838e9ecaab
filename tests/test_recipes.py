"""The recipes, launched as users launch them (`accelerate launch` with launch_configs/cpu.yaml,
2 gloo processes), on the real data in ../shared/datasets. Each recipe has one test through the
`accelerate` command itself (``real=True``); the others run Accelerate's launch command in the
warm zygote, which forks the ranks instead of starting new interpreters (tests/zygote.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ist_accel.sharded import load_folder

sys.path.insert(0, str(Path(__file__).parent))
from launch import ROOT, accelerate_launch  # noqa: E402

DATASETS = ROOT.parent / "shared" / "datasets"
CIFAR = DATASETS / "cifar10-jpeg.tar.gz"
MNIST = DATASETS / "mnist"
RECIPES = ROOT / "recipes"
needs_cifar = pytest.mark.skipif(not CIFAR.exists(), reason=f"real data missing: {CIFAR} (../shared absent)")
needs_mnist = pytest.mark.skipif(not MNIST.exists(), reason=f"real data missing: {MNIST} (../shared absent)")


def launch(script: str, args: list[str], out: Path, nproc: int = 2, **kw) -> dict:
    """Run a recipe with ``accelerate launch``; its results.json."""
    proc = accelerate_launch(RECIPES / script, nproc, [*args, "--output-dir", str(out)], **kw)
    results = out / "results.json"
    assert results.exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(results.read_text())


@pytest.mark.long
@needs_cifar
def test_resist_imagenet_on_cifar10_jpegs_reaches_the_bar(tmp_path, cifar_cache):
    """The issue's command: ImageFolder loader, 300 steps, 2 processes: >= 35% on the CIFAR-10
    test images, and the bytes IST moved within 10% of the lower bound."""
    r = launch("resist_imagenet.py", ["--data", str(CIFAR), "--data-cache", str(cifar_cache),
                                      "--arch", "preact_resnet20", "--num-subnets", "2", "--batch-size", "64",
                                      "--max-steps", "300"], tmp_path / "out")
    assert r["steps"] == 300 and r["rounds"] == 6 and r["world_size"] == 2
    assert r["final_accuracy"] >= 0.35, r
    assert 0 < r["bytes_sent_per_worker"] <= 1.10 * r["bytes_lower_per_worker"], r
    assert 0 < r["bytes_received_per_worker"] <= 1.10 * r["bytes_lower_per_worker"], r
    assert r["subnet_params"] < 0.8 * r["model_params"]  # a worker trains a fraction of the model
    assert r["compute_seconds"] > 0 and r["sync_seconds"] > 0
    assert (tmp_path / "out" / "model" / "model.safetensors.index.json").is_file()


# Final accuracy on the embedded synthetic set (10 classes, chance 0.10), measured with the
# recipe's seed, preact_resnet20, batch 32 on 2 ranks, constant lr 0.1, images at 24 px: after
# 200 steps ist 0.381, ist-warmup 0.414 (150 steps: 0.269, 0.257, too near the floor); the
# baselines learn faster, after 120 steps ddp 0.401, localsgd 0.369 (200 steps: 0.565, 0.410).
# At 32 px, 1.8x the time: 0.404, 0.410, 0.634, 0.653 after 200; at 16 px ist-warmup reached
# only 0.20. 20 steps, as before, left every method at chance (0.10-0.11). Floor: chance + 0.15.
EMBEDDED_STEPS, EMBEDDED_FLOOR = {"ist": 200, "ist-warmup": 200, "ddp": 120, "localsgd": 120}, 0.25


@pytest.mark.long
@pytest.mark.parametrize("method", ["ist", "ist-warmup", "ddp", "localsgd"])
def test_resist_imagenet_embedded_default_runs_every_method(tmp_path, method):
    warmup = ["--dense-warmup-epochs", "0.01"] if method == "ist-warmup" else []  # 1.6 batches: one round, 5 steps
    steps = EMBEDDED_STEPS[method]
    r = launch("resist_imagenet.py", ["--arch", "preact_resnet20", "--method", method.split("-")[0], "--max-steps",
                                      str(steps), "--local-steps", "5", "--batch-size", "32", "--schedule", "constant",
                                      "--image-size", "24", *warmup], tmp_path)
    assert r["method"] == method.split("-")[0] and r["steps"] == steps
    assert r["final_accuracy"] >= EMBEDDED_FLOOR, r  # it learned: chance is 0.10
    expected_syncs = {"ist": steps // 5, "ist-warmup": (steps - 5) // 5, "ddp": steps, "localsgd": steps // 5}[method]
    assert r["rounds"] == expected_syncs
    if method == "ist-warmup":
        assert r["dense_warmup_steps"] == 5
        assert r["dense_warmup_bytes_per_worker"] == pytest.approx(5 * r["model_params"] * 4)
    model_bytes = r["model_params"] * 4  # a ring all-reduce between 2 ranks sends its payload once
    if method == "ddp":  # the gradients of every step, measured by the wiretap's comm hook
        assert r["bytes_sent_per_worker"] == pytest.approx(steps * model_bytes)
    if method == "localsgd":  # Accelerate's LocalSGD syncs once more when its context exits
        assert r["bytes_sent_per_worker"] == pytest.approx((expected_syncs + 1) * model_bytes)
    if method == "ist-warmup":  # the warm-up's DDP gradients, then the rounds (measured)
        assert r["bytes_sent_per_worker"] > 5 * model_bytes
    # every other byte is counted too: set-up broadcasts, BatchNorm buffer broadcasts (DDP), gathers
    assert r["total_bytes_sent_per_worker"] > r["bytes_sent_per_worker"]
    assert r["total_bytes_sent_per_worker"] == pytest.approx(sum(r["bytes_by_phase"].values()), rel=1e-3)


@pytest.mark.long
@needs_cifar
def test_resist_cifar_short_run(tmp_path, cifar_cache):
    r = launch("resist_cifar.py", ["--data", str(CIFAR), "--data-cache", str(cifar_cache),
                                   "--arch", "preact_resnet32", "--max-steps", "40", "--local-steps", "10",
                                   "--batch-size", "32", "--eval-samples", "2000"], tmp_path / "out", real=True)
    assert (r["steps"], r["rounds"]) == (40, 4)
    assert r["ist_config"]["decomposition"] == "resist" and r["ist_config"]["num_subnets"] == 2
    assert r["bytes_sent_per_worker"] <= 1.10 * r["bytes_lower_per_worker"]


@pytest.mark.long
@needs_mnist
def test_ist_mlp_reaches_95_percent_on_mnist(tmp_path):
    r = launch("ist_mlp.py", ["--data", str(MNIST), "--num-subnets", "2"], tmp_path, real=True)
    assert r["final_accuracy"] >= 0.95, r
    assert r["subnet_params"] < 0.4 * r["model_params"]  # 784-512-512-10 of 784-1024-1024-10
    assert r["bytes_sent_per_worker"] <= 1.10 * r["bytes_lower_per_worker"]


@needs_mnist
def test_val_split_evaluates_on_a_held_out_part_of_the_training_set(tmp_path):
    """--val-split 0.1: 6,000 of MNIST's 60,000 training images are held out and scored instead
    of the test set (for picking outer settings, issue 17); the epoch shrinks to the other 54,000
    (0.05 epoch: 54000 // 128 // 2 ranks = 210 batches -> 10 steps; the whole set gives 11)."""
    r = launch("ist_mlp.py", ["--data", str(MNIST), "--hidden", "64", "64", "--epochs", "0.05", "--local-steps", "5",
                              "--val-split", "0.1"], tmp_path)
    assert r["evaluated_on"] == {"split": "held-out train", "items": 6000}
    assert r["steps"] == 10 and r["final_accuracy"] > 0.3, r


@needs_mnist
def test_torchft_diloco_baseline_trains_and_counts_its_syncs(tmp_path):
    """--method diloco: torchft's DiLoCo around the recipe's loop (a lighthouse on rank 0, one
    replica group per rank, DiLoCo's outer 0.7 / Nesterov 0.9): 45 steps sync 5 times, the last
    over the 5 steps the end cut short (as LocalSGD averages at exit); its bytes are the ring
    all-reduce of the parameters per sync (modeled: torchft's own process group is not
    torch.distributed's). Every rank ends with the same global model: the saved one (rank 0's)
    scores on the whole test set what the ranks reported, each on its half."""
    from ist_accel.data import load_mnist
    from ist_accel.models import MLP

    r = launch("ist_mlp.py", ["--data", str(MNIST), "--hidden", "64", "64", "--method", "diloco", "--max-steps", "45",
                              "--local-steps", "10"], tmp_path)
    assert (r["method"], r["steps"], r["rounds"]) == ("diloco", 45, 5)
    assert r["final_accuracy"] > 0.8, r  # measured 0.879 after 40 steps (chance 0.10)
    model_bytes = r["model_params"] * 4  # 2 ranks: a ring all-reduce sends its payload once
    assert r["bytes_sent_per_worker"] == pytest.approx(5 * model_bytes) and not r["bytes_measured"]
    model = MLP(784, [64, 64], 10, norm="batch")
    model.load_state_dict(load_folder(tmp_path / "model"))
    model.eval()
    _, test = load_mnist(MNIST)
    with torch.no_grad():
        correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in torch.utils.data.DataLoader(test, batch_size=1000))
    assert correct == round(r["final_accuracy"] * len(test)), (correct, r["final_accuracy"])


@needs_mnist
def test_ist_syncs_its_last_shorter_round_before_scoring_and_counts_it(tmp_path):
    """45 steps with --local-steps 10: IST's fifth round, 5 steps long, is synced before the
    final evaluation (nothing reads the global model mid-round), and counted among the rounds
    and the exchange's bytes, as LocalSGD's sync at exit and DiLoCo's last outer step are."""
    common = ["--data", str(MNIST), "--hidden", "64", "64", "--local-steps", "10", "--schedule", "constant"]
    r40 = launch("ist_mlp.py", [*common, "--max-steps", "40"], tmp_path / "40")
    proc = accelerate_launch(RECIPES / "ist_mlp.py", 2, [*common, "--max-steps", "45",
                                                        "--output-dir", str(tmp_path / "45")])
    r45 = json.loads((tmp_path / "45" / "results.json").read_text())
    assert (r40["rounds"], r45["rounds"]) == (4, 5)
    assert "read 5 steps into round" not in proc.stderr, proc.stderr[-3000:]
    per_round = r40["bytes_by_phase"]["exchange"] / 4  # the wiretap's count, around the engine's syncs
    assert r45["bytes_by_phase"]["exchange"] - r40["bytes_by_phase"]["exchange"] > 0.5 * per_round


@needs_mnist
@pytest.mark.parametrize("policy", ["reset", "reset-diloco", "local", "local-int4"])
def test_stop_mid_round_and_resume_equals_uninterrupted(tmp_path, policy):
    """Checkpoints every 2 rounds; a run stopped at step 45 (mid-round) resumes from step 40
    and ends with the parameters of an uninterrupted run, with DiLoCo's outer step too (its
    momentum is in the checkpoint) and under ``local`` (each rank's kept optimizer state is).
    (``carry`` is resumed in the kill drill of test_reliability.py and under DeepSpeed in
    test_zero.py.) An int4 wire resumes as exactly: its random numbers are a function of the round."""
    outer = ["--outer-lr", "0.7", "--outer-momentum", "0.9", "--outer-nesterov"] if policy.endswith("diloco") else []
    outer += ["--wire-dtype", "int4"] if policy.endswith("int4") else []
    common = ["--data", str(MNIST), "--hidden", "128", "128", "--max-steps", "70", "--local-steps", "10",
              "--checkpoint-every", "20", "--optimizer-state", policy.split("-")[0], "--schedule", "cosine", *outer]
    whole = launch("ist_mlp.py", common, tmp_path / "whole")
    proc = accelerate_launch(RECIPES / "ist_mlp.py", 2, [*common, "--output-dir", str(tmp_path / "cut"),
                                                        "--stop-after-steps", "45"])
    assert not (tmp_path / "cut" / "results.json").exists(), proc.stderr[-3000:]
    saved = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert saved == ["step_00000020", "step_00000040"], saved
    assert {p.name for p in (tmp_path / "cut" / "checkpoints" / "step_00000040").glob("ist_rank*.pt")} == \
        {"ist_rank0.pt", "ist_rank1.pt"}
    resumed = launch("ist_mlp.py", [*common, "--resume", "auto"], tmp_path / "cut")
    a = load_folder(tmp_path / "whole" / "model")
    b = load_folder(tmp_path / "cut" / "model")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-6, msg=lambda m: f"{key}: {m}")
    for key in ("steps", "rounds", "final_accuracy", "bytes_sent_per_worker", "bytes_lower_per_worker"):
        assert resumed[key] == whole[key], key


@needs_mnist
def test_eval_on_main_scores_alike_with_fewer_bytes(tmp_path):
    """Issue 34, item 5: ``--eval-on main`` puts IST's global model together on the main process
    alone and scores the whole set there: the same accuracies as every rank scoring its shard,
    and each rank's evaluation bytes fall (S = 2: one rank sends its part, the other receives)."""
    common = ["--data", str(MNIST), "--hidden", "64", "64", "--max-steps", "20", "--local-steps", "5",
              "--eval-every", "10", "--eval-samples", "500"]
    everywhere = launch("ist_mlp.py", common, tmp_path / "all")
    main = launch("ist_mlp.py", [*common, "--eval-on", "main"], tmp_path / "main")
    assert [p["accuracy"] for p in main["history"]] == [p["accuracy"] for p in everywhere["history"]]
    assert main["bytes_by_phase"]["exchange"] == everywhere["bytes_by_phase"]["exchange"]
    assert main["bytes_by_phase"]["eval"] < 0.55 * everywhere["bytes_by_phase"]["eval"], (main["bytes_by_phase"],
                                                                                        everywhere["bytes_by_phase"])


@needs_mnist
def test_recompute_bn_costs_one_small_all_reduce_per_norm(tmp_path):
    """Issue 35: ``--recompute-bn`` (here for DDP on a skewed split) adds to each evaluation one
    all-reduce per BatchNorm of (2 C + 1) float64 sums, counted by the wiretap: 2 evaluations x
    2 norms of 64 channels, ring over 2 ranks = 2 x 2 x 129 x 8 bytes per rank, nothing else."""
    common = ["--data", str(MNIST), "--hidden", "64", "64", "--max-steps", "10", "--local-steps", "5",
              "--eval-every", "5", "--eval-samples", "200", "--method", "ddp", "--split", "dirichlet:0.1"]
    plain = launch("ist_mlp.py", common, tmp_path / "plain")
    recomputed = launch("ist_mlp.py", [*common, "--recompute-bn", "2"], tmp_path / "bn")
    assert (plain["recompute_bn"], recomputed["recompute_bn"]) == (0, 2)
    assert recomputed["bytes_by_phase"]["eval"] - plain["bytes_by_phase"]["eval"] == 2 * 2 * 129 * 8
    assert recomputed["bytes_by_phase"]["exchange"] == plain["bytes_by_phase"]["exchange"]


@needs_mnist
def test_wandb_offline_run_and_logged_keys(tmp_path):
    proc = accelerate_launch(Path(__file__).parent / "workers" / "tracking_worker.py", 2,
                             ["--data", str(MNIST), "--hidden", "64", "64", "--max-steps", "40", "--local-steps",
                              "10", "--eval-every", "20", "--report-to", "wandb", "--output-dir", str(tmp_path)])
    captured = tmp_path / "captured.json"
    assert captured.exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    data = json.loads(captured.read_text())
    keys = {k for entry in data["logs"] for k in entry["values"]}
    expected = {"train/loss", "train/lr", "eval/accuracy", "ist/round", "ist/bytes_sent", "ist/bytes_received",
                "ist/bytes_sent_total", "ist/bytes_received_total", "ist/bytes_lower", "ist/bytes_lower_total",
                "ist/subnet_params", "ist/compute_seconds", "ist/sync_seconds"}
    assert expected <= keys, expected - keys
    rounds = [e["values"]["ist/round"] for e in data["logs"] if "ist/round" in e["values"]]
    assert rounds == [0, 1, 2, 3]
    assert [i["step"] for i in data["images"]] == [10, 20, 30, 40]  # one assignment picture per round
    (shape,) = data["images"][0]["shapes"]["ist/assignment"]
    assert shape[2] == 3 and shape[0] > 2  # RGB, a band of S rows per hidden layer
    assert data["config"]["ist"]["num_subnets"] == 2 and data["config"]["method"] == "ist"


@pytest.mark.parametrize("recipe", ["resist_imagenet.py", "resist_cifar.py", "ist_mlp.py"])
def test_help(recipe):
    proc = subprocess.run([sys.executable, str(RECIPES / recipe), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--max-steps" in proc.stdout and "--resume" in proc.stdout
    assert "--report-to {wandb,none}" in proc.stdout and "--output-dir" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--checkpoint-every", "15", "--local-steps", "10"], "must be a multiple of --local-steps"),
    (["--num-subnets", "3"], "world size 1 does not fit num_subnets=3"),
    (["--optimizer-state", "keep"], "invalid choice: 'keep'"),
    (["--local-steps", "0"], "--local-steps must be >= 1"),
    (["--train-seconds", "nan", "--eval-every", "10"], "--train-seconds must be a finite number of seconds >= 0"),
    (["--target-accuracy", "1.5", "--eval-every", "10"], "--target-accuracy must be an accuracy in [0, 1]"),
    (["--train-seconds", "30"], "checked at evaluations: give --eval-every N"),
    (["--eval-on", "main", "--method", "ddp"], "--eval-on main needs --method ist"),
    (["--eval-on", "main", "--recompute-bn", "4"], "--recompute-bn needs every rank"),
    (["--eval-on", "main", "--data", "/sites/{node}"], "node-local data ({rank}/{node} in --data) stays on its node"),
    (["--assignment", "rotate", "--method", "localsgd"], "--assignment rotate needs --method ist"),
    (["--recompute-bn", "-1"], "--recompute-bn must be >= 0"),
])
def test_bad_arguments_fail_before_anything_starts(tmp_path, args, message):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, str(RECIPES / "resist_cifar.py"), *args, "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_every_launch_config_loads_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted((ROOT / "launch_configs").glob("*.yaml"))
    assert {c.name for c in configs} >= {"cpu.yaml", "single_gpu.yaml", "one_node_8gpu.yaml",
                                         "two_nodes_8gpu.yaml", "deepspeed_zero2.yaml"}
    for path in configs:
        config = load_config_from_file(str(path))
        assert config.num_processes >= 1, path
        assert path.read_text().lstrip().startswith("#"), f"{path.name}: explain it in a comment"
    ds = load_config_from_file(str(ROOT / "launch_configs" / "deepspeed_zero2.yaml"))
    ds_json = ROOT / ds.deepspeed_config["deepspeed_config_file"]
    assert json.loads(ds_json.read_text())["zero_optimization"]["stage"] == 2


def _tiny_image_datasetdict(path: Path) -> None:
    """A `datasets` DatasetDict of 40x40 RGB images (Image + ClassLabel features), saved to disk."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "light"])})

    def split(n):
        labels = [i % 2 for i in range(n)]
        images = [Image.fromarray((rng.integers(0, 120, (40, 40, 3)) + 120 * y).astype("uint8")) for y in labels]
        return datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)

    datasets.DatasetDict({"train": split(256), "test": split(64)}).save_to_disk(str(path))


def test_resist_imagenet_reads_a_datasets_image_set(tmp_path):
    _tiny_image_datasetdict(tmp_path / "hf")
    r = launch("resist_imagenet.py", ["--dataset-name", str(tmp_path / "hf"), "--arch", "preact_resnet20",
                                      "--max-steps", "20", "--local-steps", "5", "--batch-size", "16",
                                      "--lr", "0.05"], tmp_path / "out", real=True)  # the command itself
    assert (r["steps"], r["rounds"]) == (20, 4)
    assert r["final_accuracy"] >= 0.9, r  # dark vs light images: learnable in 20 steps


@pytest.mark.long
def test_resume_inside_the_data_parallel_warmup(tmp_path):
    """Checkpoint at step 5 of a 10-step data-parallel warm-up, stop at 7, resume: the run
    switches to IST at step 10 and ends with the parameters of an uninterrupted run."""
    common = ["--arch", "preact_resnet20", "--max-steps", "20", "--local-steps", "5", "--batch-size", "16",
              "--dense-warmup-epochs", "0.025", "--checkpoint-every", "5", "--keep-checkpoints", "5"]
    whole = launch("resist_imagenet.py", common, tmp_path / "whole")
    assert whole["dense_warmup_steps"] == 10 and whole["rounds"] == 2
    accelerate_launch(RECIPES / "resist_imagenet.py", 2, [*common, "--output-dir", str(tmp_path / "cut"),
                                                          "--stop-after-steps", "7"])
    assert (tmp_path / "cut" / "checkpoints" / "step_00000005" / "ist_warmup.json").exists()
    resumed = launch("resist_imagenet.py", [*common, "--resume", "auto"], tmp_path / "cut")
    a = load_folder(tmp_path / "whole" / "model")
    b = load_folder(tmp_path / "cut" / "model")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-6, msg=lambda m: f"{key}: {m}")
    assert resumed["final_accuracy"] == whole["final_accuracy"]
