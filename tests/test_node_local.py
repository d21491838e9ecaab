"""Data that stays where it is (issue 35): a 2-node recipe run where each node has its own
folder with other classes (MNIST digits written as PNGs), launched as users launch it; and
--split, a seeded partition of one training set over the ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from launch import ROOT, accelerate_launch  # noqa: E402

MNIST = ROOT.parent / "shared" / "datasets" / "mnist"
needs_mnist = pytest.mark.skipif(not MNIST.exists(), reason=f"real data missing: {MNIST} (../shared absent)")
RECIPE = ROOT / "recipes" / "ist_mlp.py"
CLASSES = ",".join(str(c) for c in range(10))
# node 0 holds digits 0-4, node 1 digits 5-9, in sets of different sizes
NODES = {0: {"classes": range(0, 5), "train": 24, "test": 10}, 1: {"classes": range(5, 10), "train": 16, "test": 6}}


def write_node_folders(root: Path) -> None:
    """ImageFolder trees root/node<i>/{train,test}/<digit>/<n>.png of real MNIST digits
    (padded to 32 px, the recipe's CIFAR-style transforms' size)."""
    from PIL import Image

    from ist_accel.data import load_mnist

    train, test = load_mnist(MNIST, normalize=False)
    for node, spec in NODES.items():
        for split, data in (("train", train), ("test", test)):
            for digit in spec["classes"]:
                folder = root / f"node{node}" / split / str(digit)
                folder.mkdir(parents=True)
                for n, i in enumerate(np.flatnonzero(data.targets.numpy() == digit)[: spec[split]]):
                    Image.fromarray(np.pad(data.images[i].numpy(), 2)).save(folder / f"{n}.png")


@needs_mnist
@pytest.mark.parametrize("method", ["ist", "ddp", "localsgd", "diloco"])
def test_each_node_reads_only_its_own_folder_and_the_evaluation_aggregates_both(tmp_path, method):
    write_node_folders(tmp_path / "data")
    out = tmp_path / "out"
    proc = accelerate_launch(RECIPE, 2, ["--data", str(tmp_path / "data" / "node{rank}"), "--classes", CLASSES,
                                         "--method", method, "--hidden", "32", "32", "--batch-size", "16",
                                         "--max-steps", "10", "--local-steps", "5", "--eval-every", "5",
                                         "--output-dir", str(out)])
    assert (out / "results.json").exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    r = json.loads((out / "results.json").read_text())
    assert r["split"] == "node-local" and r["method"] == method and r["steps"] == 10 and r["world_size"] == 2
    assert r["rounds"] == {"ist": 2, "ddp": 10, "localsgd": 2, "diloco": 2}[method]
    for rank, record in enumerate(r["data_per_rank"]):
        spec = NODES[rank]
        assert record["path"] == str(tmp_path / "data" / f"node{rank}") and record["node"] == 0
        assert record["train_classes"] == {str(d): spec["train"] for d in spec["classes"]}  # only its own files
        assert record["eval_classes"] == {str(d): spec["test"] for d in spec["classes"]}
        assert (record["train_items"], record["eval_items"]) == (5 * spec["train"], 5 * spec["test"])
    # the global model scored on both nodes' test sets: 50 + 30 items, at every evaluation
    assert r["evaluated_on"] == {"split": "node-local test", "items": 80}
    assert len(r["history"]) == 2 and all(0 <= p["accuracy"] <= 1 for p in r["history"])
    # the same steps on both nodes whatever their sizes: 7 and 5 batches of 16 -> an epoch of 6
    assert r["epochs_per_rank"] == pytest.approx([10 * 16 / 120, 10 * 16 / 80])


@needs_mnist
def test_a_run_on_node_local_data_stopped_mid_epoch_resumes_as_if_never_stopped(tmp_path):
    """Checkpoints every round; stopped at step 17 (mid-round, in the middle of both nodes' local
    epochs: 7 and 5 batches), resumed from step 15: the same model, steps and accuracy as an
    uninterrupted run, each node going on through its own set where it was."""
    from ist_accel.sharded import load_folder

    write_node_folders(tmp_path / "data")
    common = ["--data", str(tmp_path / "data" / "node{rank}"), "--classes", CLASSES, "--hidden", "32", "32",
              "--batch-size", "16", "--max-steps", "25", "--local-steps", "5", "--checkpoint-every", "5"]

    def run(out, *extra):
        return accelerate_launch(RECIPE, 2, [*common, "--output-dir", str(out), *extra])

    proc = run(tmp_path / "whole")
    assert (tmp_path / "whole" / "results.json").exists(), proc.stderr[-4000:]
    run(tmp_path / "cut", "--stop-after-steps", "17")
    assert not (tmp_path / "cut" / "results.json").exists()
    proc = run(tmp_path / "cut", "--resume", "auto")
    assert (tmp_path / "cut" / "results.json").exists(), proc.stderr[-4000:]
    whole, resumed = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "cut"))
    for key in ("steps", "rounds", "final_accuracy", "epochs_per_rank", "data_per_rank"):
        assert resumed[key] == whole[key], key
    a, b = load_folder(tmp_path / "whole" / "model"), load_folder(tmp_path / "cut" / "model")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-6, msg=lambda m: f"{key}: {m}")


def parse_recipe_args(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """The recipe's argument parsing alone, as rank ``env["RANK"]`` of a launch sees it."""
    code = f"import runpy; runpy.run_path({str(RECIPE)!r})['parse_args']()"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_a_missing_node_folder_is_an_error_naming_the_node_before_any_process_group(tmp_path):
    (tmp_path / "node0").mkdir()
    proc = parse_recipe_args(["--data", str(tmp_path / "node{rank}"), "--output-dir", str(tmp_path / "out")],
                             {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                              "GROUP_RANK": "0"})
    assert proc.returncode != 0
    assert (f"node-local data missing on rank 1 (node 0): {tmp_path}/node{{rank}} with {{rank}}=1 -> "
            f"{tmp_path}/node1: no such file or folder") in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@needs_mnist
def test_split_gives_each_rank_its_seeded_part_of_one_training_set(tmp_path):
    """--split classes:5 over 2 ranks: each rank trains on 5 digits of MNIST's training set,
    evaluation stays on the whole (shared) test set, the step budget that of iid."""
    out = tmp_path / "out"
    proc = accelerate_launch(RECIPE, 2, ["--data", str(MNIST), "--split", "classes:5", "--hidden", "32",
                                         "--max-steps", "4", "--local-steps", "2", "--eval-samples", "500",
                                         "--output-dir", str(out)])
    assert (out / "results.json").exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    r = json.loads((out / "results.json").read_text())
    assert r["split"] == "classes:5" and r["evaluated_on"] == {"split": "test", "items": 500}
    held = [set(rec["train_classes"]) for rec in r["data_per_rank"]]
    assert [len(h) for h in held] == [5, 5] and not held[0] & held[1]
    assert sum(rec["train_items"] for rec in r["data_per_rank"]) == 60000


def test_lm_recipe_trains_each_rank_on_its_own_text_file(tmp_path):
    """recipes/ist_trainer_lm.py with --train-file/--eval-file holding {rank}: each rank's own
    blocks (files of different sizes), the same steps on both, perplexity over both eval files."""
    from launch import torchrun
    from test_lm_recipe import write_corpus

    for rank, sentences in ((0, 1200), (1, 600)):
        write_corpus(tmp_path / f"train{rank}.txt", sentences, rank)
        write_corpus(tmp_path / f"eval{rank}.txt", 100 * (rank + 1), 10 + rank)
    out = tmp_path / "out"
    proc = torchrun(ROOT / "recipes" / "ist_trainer_lm.py", 2,
                    ["--model-config", "gpt2-tiny", "--decomposition", "layers", "--train-file",
                     str(tmp_path / "train{rank}.txt"), "--eval-file", str(tmp_path / "eval{rank}.txt"),
                     "--max-steps", "10", "--local-steps", "5", "--output-dir", str(out)], timeout=600)
    assert (out / "results.json").exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads((out / "results.json").read_text())
    assert r["split"] == "node-local" and r["steps"] == 10 and r["rounds"] == 2
    assert [d["train_file"] for d in r["data_per_rank"]] == [str(tmp_path / f"train{k}.txt") for k in (0, 1)]
    assert [d["eval_file"] for d in r["data_per_rank"]] == [str(tmp_path / f"eval{k}.txt") for k in (0, 1)]
    blocks = [d["train_blocks"] for d in r["data_per_rank"]]
    assert blocks[0] > 1.5 * blocks[1] > 0  # each its own file, not one shared set cut in halves
    assert r["final_perplexity"] < r["initial_perplexity"]
