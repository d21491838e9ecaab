"""A model built on the meta device (also a transformers from_config under init_empty_weights) trains exactly as the same model built whole would
(issue 16): the distributed run of tests/workers/meta_worker.py (2 gloo ranks) equals a
single-process reference started from ``materialize(meta_model, seed)``; evaluation is
streamed and equal to the reference's; the sharded save is the gathered state; the global
model is never allocated on any rank."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from common import batch_for, eval_items, loss_fn, score  # noqa: E402
from launch import torchrun  # noqa: E402
from meta_worker import meta_model  # noqa: E402

from ist_accel import ISTConfig, decompose  # noqa: E402
from ist_accel.init import MetaInit, materialize, materialize_module  # noqa: E402
from ist_accel.reference import ReferenceIST  # noqa: E402
from ist_accel.sharded import load_folder  # noqa: E402

CASES = {"mlp": "mlp", "resnet": "resnet", "mlp_file": "mlp", "gpt2": "gpt2"}


def initial_file_values() -> dict[str, torch.Tensor]:
    """The MLP's initial values for the file case: another seed than the meta cases'."""
    model = materialize(meta_model("mlp"), seed=77)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("meta")
    save_file(initial_file_values(), str(out / "initial.safetensors"))
    proc = torchrun("meta_worker.py", 2, ["--out", str(out), "--initial", str(out / "initial.safetensors")],
                    timeout=300)
    assert (out / "gpt2_rank1.json").exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def reference(case: str) -> tuple[torch.nn.Module, float]:
    torch.set_num_threads(1)
    name = CASES[case]
    if case == "mlp_file":
        model = meta_model(name).to_empty(device="cpu")
        model.load_state_dict(initial_file_values())
    else:
        model = materialize(meta_model(name), seed=5)
    decomposition = "layers" if name == "gpt2" else "auto"
    ref = ReferenceIST(decompose(model, ISTConfig(num_subnets=2, seed=5, decomposition=decomposition)),
                       lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
    for r in range(3):
        ref.run_round([[[batch_for(name, s, 0, t) for t in range(2 * r, 2 * r + 2)]] for s in range(2)], loss_fn)
    items = eval_items(name)
    with ref.decomposition.eval_view(model) as view, torch.no_grad():
        correct, count = score(view, (torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])))
    return model, correct / count


@pytest.mark.parametrize("case", list(CASES))
def test_meta_model_trains_as_the_materialized_one(runs, case):
    expected, accuracy = reference(case)
    got = torch.load(runs / f"{case}_global.pt")
    saved = load_folder(runs / f"{case}_model")
    for name, value in expected.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
            assert torch.equal(saved[name], got[name]), name  # the sharded save is the gathered state
    for r in range(2):
        seen = json.loads((runs / f"{case}_rank{r}.json").read_text())
        assert seen["streams"] and seen["rounds"] == 3
        assert seen["accuracy"] == pytest.approx(accuracy, abs=1e-9)
        assert seen["global_still_meta"] and seen["resident_bytes"]["global_model"] == 0
        assert seen["subnet_numel"] < seen["global_numel"]
        assert "meta device" in seen["refused_gather"]


def test_meta_init_is_deterministic_per_module_and_independent_of_order():
    """The same (seed, module) gives the same values whichever other modules were made
    first (each rank materializes other units); another seed gives others."""
    model = meta_model("resnet")
    paths = [p for p, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    forward = {p: materialize_module(model, p, 5) for p in paths}
    source = MetaInit(model, 5)
    for p in reversed(paths):
        for name, value in materialize_module(model, p, 5).items():
            assert torch.equal(value, forward[p][name])
            assert torch.equal(source.tensor(name), value)
    conv = next(p for p in paths if isinstance(model.get_submodule(p), torch.nn.Conv2d))
    other = materialize_module(model, conv, 6)
    assert not torch.equal(other[f"{conv}.weight"], forward[conv][f"{conv}.weight"])
    whole = materialize(model, 5)
    for p in paths:
        for name, value in forward[p].items():
            assert torch.equal(whole.state_dict()[name], value)
