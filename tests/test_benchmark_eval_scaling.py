"""benchmarks/eval_scaling.py: refolding an exported model's evaluation scaling."""

import importlib.util
import sys
from pathlib import Path

import torch

from ist_accel.decompositions import decompose
from ist_accel.decompositions.scaling import fold_scalings
from ist_accel.models import build_model

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports its neighbour, as when run from there
    try:
        spec = importlib.util.spec_from_file_location("eval_scaling", ROOT / "benchmarks" / "eval_scaling.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        return bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_the_config_is_read_from_the_run_command_and_a_refold_replaces_the_factor():
    bench = _bench()
    command = ["python", "-m", "accelerate.commands.launch", "--num_processes", "4", "recipes/resist_cifar.py",
               "--arch", "preact_resnet20", "--seed", "0", "--stages=layer3:1-2", "--min-blocks=1"]
    config, folded = bench.run_config(command)
    assert (config.num_subnets, config.group_size, config.stages, config.min_blocks, folded) == (4, 1, "layer3:1-2", 1, True)
    torch.manual_seed(0)
    model = build_model("preact_resnet20", num_classes=10)
    decomposition = decompose(model, config)
    scalings = decomposition.eval_scalings()
    assert {f for _, f, _ in scalings} == {0.5}  # max(1/S, m/N) = max(1/4, 1/2): two blocks, one per subnet
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    exported = fold_scalings(model, raw, scalings)  # what the recipe saves
    branch = f"{scalings[0][0]}.weight"
    torch.testing.assert_close(exported[branch], raw[branch] * 0.5)
    unscaled = bench.rescaled(model, exported, decomposition, 1.0, folded=True)
    quarter = bench.rescaled(model, exported, decomposition, 0.25, folded=True)
    for key in raw:
        torch.testing.assert_close(unscaled[key], raw[key])  # factor 1: the trained weights themselves
    torch.testing.assert_close(quarter[branch], raw[branch] * 0.25)
    # a run saved without eval scaling: its weights are the raw ones
    _, folded = bench.run_config(command + ["--no-eval-scaling"])
    assert not folded
    torch.testing.assert_close(bench.rescaled(model, raw, decomposition, 0.5, folded)[branch], exported[branch])
