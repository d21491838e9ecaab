"""recipes/ist_trainer_lm.py under torchrun (2 processes): causal-LM training with the
HF Trainer and IST on a text file the test writes; eval perplexity of the global model
falls well below its starting value with every decomposition."""

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from launch import ROOT, free_port, torchrun  # noqa: E402

RECIPE = ROOT / "recipes" / "ist_trainer_lm.py"


def write_corpus(path: Path, sentences: int, seed: int) -> Path:
    """Sentences of a small English-like grammar: learnable, not memorizable at once."""
    rng = random.Random(seed)
    words = {"det": ["the", "a", "every", "some"], "adj": ["quick", "lazy", "red", "tiny", "bright", "old"],
             "noun": ["fox", "dog", "model", "worker", "subnet", "round", "layer"],
             "verb": ["trains", "jumps over", "averages", "sends", "holds", "follows"]}
    lines = [f"{rng.choice(words['det'])} {rng.choice(words['adj'])} {rng.choice(words['noun'])} "
             f"{rng.choice(words['verb'])} {rng.choice(words['det'])} {rng.choice(words['noun'])}."
             for _ in range(sentences)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(tmp_path, *args, real: bool = False):
    """The recipe on 2 ranks; ``real``: through the torchrun command with a bare environment,
    as a user launches it, otherwise forked from the tests' warm zygote (tests/zygote.py)."""
    args = ["--train-file", str(write_corpus(tmp_path / "train.txt", 3000, 0)),
            "--eval-file", str(write_corpus(tmp_path / "eval.txt", 300, 1)), "--output-dir", str(tmp_path / "out"), *args]
    if real:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(RECIPE), *args]
        env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PATH": "/usr/bin:/bin"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    else:
        proc = torchrun(RECIPE, 2, args, timeout=900)
    results = tmp_path / "out" / "results.json"
    assert results.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(results.read_text())


@pytest.mark.parametrize("model,decomposition,steps", [("gpt2-tiny", "layers", 100), ("llama-tiny", "heads", 60),
                                                       ("gpt2-tiny", "ffn", 60)])
@pytest.mark.long
def test_perplexity_falls_well_below_its_start(tmp_path, model, decomposition, steps):
    r = run(tmp_path, "--model-config", model, "--decomposition", decomposition, "--max-steps", str(steps),
            real=decomposition == "heads")
    assert r["steps"] == steps and r["rounds"] == steps // 10
    assert r["initial_perplexity"] > 100  # bytes: about uniform over 259 tokens at the start
    assert r["final_perplexity"] < 0.1 * r["initial_perplexity"], r
    assert r["bytes_sent_per_worker"] <= 1.10 * r["bytes_lower_per_worker"]
    assert r["subnet_params"] < r["model_params"]
    assert (tmp_path / "out" / "model" / "model.safetensors.index.json").exists()


def test_help_and_bad_arguments(tmp_path):
    ok = subprocess.run([sys.executable, str(RECIPE), "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--decomposition {layers,ffn,heads}" in ok.stdout
    bad = subprocess.run([sys.executable, str(RECIPE), "--model-config", "gpt2-tiny", "--train-file", "nope.txt"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no such text file: nope.txt" in bad.stderr
    # the recipe's own parse_args, in this process (the command line above shows how it reaches the user)
    spec = importlib.util.spec_from_file_location("ist_trainer_lm", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    with pytest.raises(SystemExit, match="--save-steps 15 must be a multiple of --local-steps 10"):
        recipe.parse_args(["--model-config", "gpt2-tiny", "--train-file", str(RECIPE), "--save-steps", "15"])
