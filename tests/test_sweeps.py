"""W&B sweep YAMLs in recipes/sweeps/: every swept value is accepted by its program's
parser (as W&B passes it, --name=value, on every rank), and one sampled configuration
runs a few steps offline."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from launch import ROOT, accelerate_launch, torchrun  # noqa: E402

SWEEPS = sorted((ROOT / "recipes" / "sweeps").glob("*.yaml"))


def load(path):
    return yaml.safe_load(path.read_text())


def recipe(program):
    spec = importlib.util.spec_from_file_location(Path(program).stem, ROOT / program)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def choices(spec):
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def sample(parameters, rng):
    return {name: rng.choice(choices(spec)) if "values" in spec else
            (spec["value"] if "value" in spec else rng.uniform(spec["min"], spec["max"]))
            for name, spec in parameters.items()}


def argv(config):
    return [f"--{name}={value}" for name, value in config.items()]


def test_sweeps_exist_for_both_recipes():
    assert {load(p)["program"] for p in SWEEPS} == {"recipes/resist_cifar.py", "recipes/ist_trainer_lm.py"}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_swept_value_is_accepted_by_the_program(path, monkeypatch):
    sweep = load(path)
    assert {"program", "method", "metric", "parameters", "command"} <= set(sweep)
    assert sweep["command"][-2:] == ["${program}", "${args}"] and (ROOT / sweep["program"]).is_file()
    assert {"num-subnets", "local-steps", "lr", "min-blocks"} <= set(sweep["parameters"])
    module = recipe(sweep["program"])
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WORLD_SIZE", "8")  # the launch in the sweep's command: 8 processes
    base = {name: choices(spec)[0] for name, spec in sweep["parameters"].items()}
    for name, spec in sweep["parameters"].items():
        for value in choices(spec):
            args = module.parse_args(argv({**base, name: value}))
            assert getattr(args, name.replace("-", "_")) == type(getattr(args, name.replace("-", "_")))(value)
            assert args.num_subnets * args.group_size == 8


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_one_sampled_configuration_runs_offline(path, tmp_path):
    sweep = load(path)
    config = sample(sweep["parameters"], random.Random(7))
    # this machine: 2 CPU processes, a small model, a few steps, no downloads
    config.update({"num-subnets": 2, "report-to": "wandb", "output-dir": str(tmp_path / "out")})
    config["local-steps"] = min(int(config["local-steps"]), 10)
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    if sweep["program"].endswith("resist_cifar.py"):
        config.pop("dataset-name")  # the embedded synthetic set
        config.update({"arch": "preact_resnet20", "max-steps": 20, "batch-size": 16, "epochs": 1})
        proc = accelerate_launch(ROOT / sweep["program"], 2, argv(config), env=env)
    else:
        config.update({"max-steps": 20, "eval-steps": 10})
        proc = torchrun(ROOT / sweep["program"], 2, argv(config), timeout=600, cwd=ROOT, env=env)  # the zygote
    results = tmp_path / "out" / "results.json"
    assert results.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    assert json.loads(results.read_text())["steps"] == 20
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")) or list(
        (tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))
