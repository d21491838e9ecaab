"""`ist-accel plan` and bad-input errors raised before anything runs."""

import json
import subprocess
import sys

import pytest

from ist_accel.cli import main
from ist_accel.config import ISTConfig

KEYS = {"model_params", "shared_params", "partitioned_units", "subnet_params", "bytes_per_round_lower",
        "localsgd_bytes_per_round", "ddp_bytes_per_step"}


def _plan(capsys, *args):
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("S,paper", [(2, 0.686), (4, 0.543), (8, 0.487)])
def test_preact_resnet101_matches_resist_table_1(capsys, S, paper):
    """ResIST Table 1: ResIST / local-SGD bytes per round on CIFAR-10 = subnet share."""
    plan = _plan(capsys, "--model", "preact_resnet101", "--num-classes", "10", "--num-subnets", str(S))
    assert KEYS <= plan.keys()
    ratio = sum(plan["subnet_params"]) / len(plan["subnet_params"]) / plan["model_params"]
    assert abs(ratio - paper) / paper < 0.06, ratio
    assert plan["partitioned_units"] == 22 and len(plan["subnet_params"]) == S
    assert plan["shared_params"] < min(plan["subnet_params"]) < plan["model_params"]
    assert plan["bytes_per_round_lower"] < plan["localsgd_bytes_per_round"]
    assert plan["ddp_bytes_per_step"] == pytest.approx(2 * (S - 1) / S * plan["model_params"] * 4)


def test_torchvision_names_and_mlps_are_accepted(capsys):
    plan = _plan(capsys, "--model", "resnet50", "--num-subnets", "2")
    assert plan["partitioned_units"] == 5
    plan = _plan(capsys, "--model", "mlp", "--num-subnets", "4", "--hidden", "512,512")
    assert plan["decomposition"] == "ist_mlp" and plan["partitioned_units"] == 1024
    # a middle layer keeps 1/S^2 of its weights: 784x128 + 128x128 + 128x10 + biases
    assert plan["subnet_params"][0] == 784 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10


def test_markdown_table_and_console_script():
    out = subprocess.run(
        [sys.executable, "-m", "ist_accel.cli", "plan", "--model", "preact_resnet20", "--num-subnets", "2"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "| model params |" in out and "LocalSGD" in out


@pytest.mark.parametrize("args,message", [
    (["--model", "preact_resnet20", "--num-subnets", "0"], "num_subnets must be >= 1, got 0"),
    (["--model", "preact_resnet20", "--num-subnets", "3"], "num_subnets=3 exceeds the 2 partitionable blocks"),
    (["--model", "preact_resnet20", "--num-subnets", "2", "--min-blocks", "3"], "min_blocks=3 exceeds the 2"),
    (["--model", "mlp", "--num-subnets", "3", "--hidden", "512"], "width 512, not divisible by num_subnets=3"),
    (["--model", "mlp", "--num-subnets", "2", "--decomposition", "resist"], "no partitionable residual stack"),
    (["--model", "nope", "--num-subnets", "2"], "nope"),
])
def test_bad_input_gets_a_clear_error(capsys, args, message):
    assert main(["plan", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("field,value,message", [
    ("num_subnets", 0, "num_subnets must be >= 1"),
    ("local_steps", 1.5, "local_steps must be an integer"),
    ("optimizer_state", "keep", "optimizer_state must be one of reset, carry, local; got 'keep'"),
    ("wire_dtype", "int2", "wire_dtype must be one of fp32, bf16, fp16, fp64, int8, int4, fp8; got 'int2'"),
    ("wire_block", 0, "wire_block must be >= 1"),
    ("group_size", True, "group_size must be an integer"),
])
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        ISTConfig(**{field: value})


def test_world_size_must_be_subnets_times_group():
    with pytest.raises(ValueError, match="world size 6 does not fit num_subnets=2 x group_size=2 = 4"):
        ISTConfig(num_subnets=2, group_size=2).check_world_size(6)
    ISTConfig(num_subnets=2, group_size=2).check_world_size(4)
