"""Bad input, fuzzed (hypothesis): every invalid combination of subnets, group size, local
steps, minimum depth, decomposition, stages, dtype, world size and model gets a clear error
before any process group or file exists; every valid one passes. The oracle below is the
specification, written independently of the code it checks."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ist_accel import ISTConfig, check_setup
from ist_accel.models import MLP, build_model
from ist_accel.recipe import preflight

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"resnet": build_model("preact_resnet20", num_classes=4), "mlp": MLP(12, [16, 16], 3, norm="batch")}
# preact_resnet20's partitionable runs: 'longest' = layer3 blocks 1-2; 'all' = blocks 1-2 of each stage
STAGES = {"longest": [2], "all": [2, 2, 2], "layer1:0-2": [3], "layer9": None, "layer1:2-1": None}
MLP_WIDTH = 16

def expected_error(S, G, local, m, decomposition, stages, wire, world, model) -> str | None:
    """The field an error must name, or None for a valid setup."""
    def is_int(v, lo):
        return type(v) is int and v >= lo

    for name, value, lo in (("num_subnets", S, 1), ("local_steps", local, 1), ("min_blocks", m, 0),
                            ("group_size", G, 1)):
        if not is_int(value, lo):
            return name
    if decomposition not in ("auto", "resist", "ist_mlp", "layers", "ffn", "heads"):
        return "decomposition"
    if wire not in ("fp32", "bf16", "fp16", "int8", "int4", "fp8"):
        return "wire_dtype"
    if not isinstance(stages, str) or not stages:
        return "stages"
    if not is_int(world, 1):
        return "world_size"
    if S * G != world:
        return "world size"
    kind = decomposition if decomposition != "auto" else ("ist_mlp" if model == "mlp" else "resist")
    if model == "mlp":
        if kind in ("resist", "layers"):
            return "residual" if kind == "resist" else "not a transformers model"
        return None if MLP_WIDTH % S == 0 else "width"
    if kind == "ist_mlp":
        return "Linear"
    if kind == "layers":
        return "not a transformers model"
    sizes = STAGES[stages]
    if sizes is None:
        return "stage"
    if any(m > n for n in sizes):
        return "min_blocks"
    if any(S > n and m == 0 for n in sizes):
        return "num_subnets"
    return None


PLAUSIBLE = {"S": [1, 2, 3, 4, 8], "G": [1, 2], "local": [1, 5, 50], "m": [0, 0, 1, 2, 3],
             "decomposition": ["auto", "resist", "ist_mlp", "layers"], "stages": [*STAGES, "longest"],
             "wire": ["fp32", "bf16", "fp16", "int8", "int4", "fp8"]}
BAD = {"S": [0, -1, True, 2.0, "2", None], "G": [0, -2, True, 1.0], "local": [0, -3, 2.5, True, "5"],
       "m": [-1, "1", False, 1.5], "decomposition": ["blocks", 3, None], "stages": ["", 7, None],
       "wire": ["e4m3", "float32", "int2", 16], "world": [-1, 0, 3, 7, 2.5, "2"]}


@st.composite
def setups(draw):
    """A plausible setup with the right world size, then (often) one field made bad."""
    setup = {k: draw(st.sampled_from(v)) for k, v in PLAUSIBLE.items()}
    setup["world"] = setup["S"] * setup["G"]
    corrupt = draw(st.sampled_from([None, None, *BAD]))
    if corrupt:
        setup[corrupt] = draw(st.sampled_from(BAD[corrupt]))
    setup["model"] = draw(st.sampled_from(sorted(MODELS)))
    return setup


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=setups())
def test_setup_is_valid_exactly_when_the_spec_says(setup):
    S, G, local, m, decomposition, stages, wire, world, model = (
        setup[k] for k in ("S", "G", "local", "m", "decomposition", "stages", "wire", "world", "model"))
    field = expected_error(S, G, local, m, decomposition, stages, wire, world, model)
    event(f"invalid: {field}" if field else "valid")
    kwargs = dict(num_subnets=S, group_size=G, local_steps=local, min_blocks=m, decomposition=decomposition,
                  stages=stages, wire_dtype=wire)
    if field is None:
        decomposition_ = check_setup(MODELS[model], ISTConfig(**kwargs), world)
        assert decomposition_.num_subnets == S
    else:
        with pytest.raises((ValueError, TypeError)) as caught:
            check_setup(MODELS[model], ISTConfig(**kwargs), world)
        assert field in str(caught.value), (field, str(caught.value))
    assert not dist.is_initialized()


def _recipe():
    spec = importlib.util.spec_from_file_location("resist_cifar", ROOT / "recipes" / "resist_cifar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECIPE = _recipe()
FLAG_VALUES = {
    "--num-subnets": ["0", "1", "2", "3", "4", "x"],
    "--group-size": ["0", "1", "2", "-1"],
    "--local-steps": ["0", "1", "5", "10", "2.5"],
    "--min-blocks": ["-1", "0", "1", "2", "3"],
    "--decomposition": ["auto", "resist", "ist_mlp", "blocks"],
    "--wire-dtype": ["fp32", "bf16", "fp8", "int4", "int3"],
    "--mixed-precision": ["no", "bf16", "fp8"],
    "--checkpoint-every": ["0", "10", "15"],
    "--arch": ["preact_resnet20", "preact_resnet32", "resnet9"],
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(flags=st.dictionaries(st.sampled_from(sorted(FLAG_VALUES)), st.integers(0, 5)),
       arch=st.sampled_from(FLAG_VALUES["--arch"]), world=st.sampled_from([1, 2, 3, 4]))
def test_recipe_cli_fails_cleanly_or_runs_its_preflight(tmp_path, monkeypatch, capsys, flags, arch, world):
    flags = {**flags, "--arch": FLAG_VALUES["--arch"].index(arch)}
    argv = []
    for flag, i in sorted(flags.items()):
        argv += [flag, FLAG_VALUES[flag][i % len(FLAG_VALUES[flag])]]
    out = tmp_path / "never_created"
    monkeypatch.setenv("WORLD_SIZE", str(world))
    try:
        args = RECIPE.parse_args([*argv, "--output-dir", str(out)])
        preflight(args, build_model(args.arch, num_classes=10))
    except SystemExit as stop:  # argparse (code 2, message on stderr) or a check (the message itself)
        message = capsys.readouterr().err if stop.code == 2 else str(stop.code)
        assert message.strip(), argv
        outcome = "usage" if stop.code == 2 else "check"
    else:
        outcome = None
    event(outcome or "accepted")
    assert outcome == cli_verdict(dict(zip(argv[::2], argv[1::2])), world), (argv, world, outcome)
    assert not out.exists() and not dist.is_initialized()


# The recipe's command line, stated from the spec (the flags' --help, docs/accelerate.md "Launch configs"
# and docs/wandb.md, docs/reliability.md "Bad input"), not from recipe.check_args:
INTEGER_FLAGS = ("--num-subnets", "--group-size", "--local-steps", "--min-blocks", "--checkpoint-every")
CHOICES = {"--decomposition": ("auto", "resist", "ist_mlp", "layers", "ffn", "heads"),
           "--wire-dtype": ("fp32", "bf16", "fp16", "int8", "int4", "fp8"), "--mixed-precision": ("no", "fp16", "bf16"),
           "--arch": tuple(f"preact_resnet{d}" for d in (18, 34, 50, 101, 152, 20, 32, 56, 110))}
RECIPE_DEFAULTS = {"--local-steps": "50", "--min-blocks": "0", "--checkpoint-every": "0", "--decomposition": "resist"}
# ResIST's default stage ('longest') is layer3 without its strided first block: 3 - 1 and 5 - 1
PARTITIONABLE_BLOCKS = {"preact_resnet20": 2, "preact_resnet32": 4}


def cli_verdict(flags: dict, world: int) -> str | None:
    """How ``resist_cifar.py`` with ``flags`` on ``world`` processes must end: ``"usage"``
    (argparse refuses: a value that is not an integer, or not among the choices), ``"check"``
    (a clear message before anything runs) or None (accepted)."""
    for flag, value in flags.items():
        if flag in INTEGER_FLAGS and not value.lstrip("-").isdigit():
            return "usage"
        if flag in CHOICES and value not in CHOICES[flag]:
            return "usage"
    get = {**RECIPE_DEFAULTS, **flags}.get
    local, m, every = int(get("--local-steps")), int(get("--min-blocks")), int(get("--checkpoint-every"))
    if local < 1 or m < 0 or every < 0:
        return "check"
    if every % local:  # IST checkpoints are taken at round ends
        return "check"
    # The world is S subnet groups x G ranks. Of S and G, the one not given is the world
    # divided by the other (it must divide it); neither given: G = 1, S = world.
    S = int(flags["--num-subnets"]) if "--num-subnets" in flags else None
    G = int(flags["--group-size"]) if "--group-size" in flags else None
    if (S is not None and S < 1) or (G is not None and G < 1):
        return "check"
    if S is None and G is None:
        S, G = world, 1
    elif S is None or G is None:
        given = S if G is None else G
        if world % given:
            return "check"
        S, G = (S, world // S) if G is None else (world // G, G)
    if S * G != world:
        return "check"
    # A ResNet is cut by ResIST only (ist_mlp needs a chain of Linear layers; layers, ffn and
    # heads a transformers model). Each subnet needs a block of its own, unless a minimum
    # depth lets subnets share blocks; the minimum cannot exceed the blocks there are.
    if get("--decomposition") not in ("auto", "resist"):
        return "check"
    blocks = PARTITIONABLE_BLOCKS[get("--arch")]
    if m > blocks or (S > blocks and m == 0):
        return "check"
    return None


def test_cli_oracle_on_hand_picked_lines():
    """The oracle itself, on cases worked out by hand (ResNet-20: 2 partitionable blocks)."""
    r20 = {"--arch": "preact_resnet20"}
    assert cli_verdict(r20, 2) is None  # S = 2, G = 1
    assert cli_verdict({**r20, "--num-subnets": "2"}, 4) is None  # G = 4 / 2
    assert cli_verdict({**r20, "--num-subnets": "3"}, 4) == "check"  # 3 does not divide 4
    assert cli_verdict({**r20, "--group-size": "2"}, 4) is None  # S = 2
    assert cli_verdict({**r20, "--group-size": "2"}, 3) == "check"
    assert cli_verdict({**r20, "--num-subnets": "2", "--group-size": "2"}, 2) == "check"  # 4 != 2
    assert cli_verdict(r20, 3) == "check"  # S = 3 > 2 blocks
    assert cli_verdict({**r20, "--min-blocks": "1"}, 3) is None  # ... unless blocks are shared
    assert cli_verdict({**r20, "--min-blocks": "3"}, 1) == "check"
    assert cli_verdict({**r20, "--local-steps": "5", "--checkpoint-every": "15"}, 1) is None
    assert cli_verdict({**r20, "--local-steps": "10", "--checkpoint-every": "15"}, 1) == "check"
    assert cli_verdict({**r20, "--checkpoint-every": "10"}, 1) == "check"  # default 50 local steps
    assert cli_verdict({**r20, "--local-steps": "2.5"}, 1) == "usage"
    assert cli_verdict({**r20, "--decomposition": "ist_mlp"}, 1) == "check"
    assert cli_verdict({**r20, "--decomposition": "blocks"}, 1) == "usage"
    assert cli_verdict({"--arch": "resnet9"}, 1) == "usage"


def test_fault_specs_are_checked():
    from ist_accel.faults import parse_faults

    assert parse_faults("kill:rank=1:step=3,nan:rank=0:step=5:point=sync")[1].point == "sync"
    for bad in ("kill:rank=1", "boom:rank=1:step=2", "kill:rank=1:step=2:point=later", "kill:rank=x:step=1"):
        with pytest.raises(ValueError, match="IST_FAULT entry"):
            parse_faults(bad)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
