"""BatchNorm statistics recomputed over every rank's data (issue 35's remedy for skewed
data): the statistics are those of each norm's input over the pooled batches, layer by
layer; across ranks, IST's global model gets what one process computes over all ranks'
batches; the trained statistics come back afterwards."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from common import batch_for, eval_items, make_model  # noqa: E402
from launch import torchrun  # noqa: E402

from ist_accel.norm_statistics import norms_in_call_order, recompute_batchnorm, recomputed_batchnorm  # noqa: E402


class TwoNorms(nn.Module):
    """Conv → BN → ReLU → conv → BN → pool → linear → BN1d, with the norms declared in the
    reverse of the order the forward reaches them."""

    def __init__(self) -> None:
        super().__init__()
        self.head_norm, self.norm2, self.norm1 = nn.BatchNorm1d(5), nn.BatchNorm2d(6), nn.BatchNorm2d(4)
        self.conv1, self.conv2, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 6, 3), nn.Linear(6, 5)

    def forward(self, x):
        x = self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))
        return self.head_norm(self.head(x.mean((2, 3))))


def batches(count=3, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64) * 2 + shift for _ in range(count)]


def inputs_of(model, norms, data):
    """Each norm's input over ``data`` in one evaluation-mode forward, concatenated."""
    seen = {n: [] for n in norms}
    handles = [n.register_forward_pre_hook(lambda m, a: seen[m].append(a[0])) for n in norms]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_statistics_are_those_of_each_norms_input_layer_by_layer():
    torch.manual_seed(0)
    model = TwoNorms().double()
    data = batches(shift=1.5)
    order = norms_in_call_order(model, data[0])
    assert order == [model.norm1, model.norm2, model.head_norm]
    recompute_batchnorm(model, data)  # one process: no all-reduce
    assert not model.training
    for norm, x in inputs_of(model, order, data).items():  # what the scored model feeds each norm
        dims = [0, *range(2, x.dim())]
        torch.testing.assert_close(norm.running_mean, x.mean(dims), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(norm.running_var, x.var(dims), rtol=1e-12, atol=1e-12)


def test_the_trained_statistics_come_back_and_bad_input_is_refused():
    torch.manual_seed(0)
    model = TwoNorms().double()
    model.train()
    with torch.no_grad():
        model(batches(1, seed=3)[0])  # some trained statistics
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    x = batches(1, seed=4)[0]
    with recomputed_batchnorm(model, batches(shift=-2.0)) as scored:
        assert scored is model
        recomputed = model(x)
        assert not torch.equal(model.norm1.running_mean, trained["norm1.running_mean"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert not torch.allclose(model(x), recomputed)
    with pytest.raises(ValueError, match="at least one batch"):
        recompute_batchnorm(model, [])


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_ist_global_model_gets_the_statistics_of_every_ranks_batches(tmp_path, name):
    """Two ranks, IST S = 2, float64: rank r's batches are shifted by r. The recomputed global
    model's logits equal those of the exported global model with its statistics recomputed in
    one process over both ranks' batches; after the block, the trained statistics score again."""
    proc = torchrun("accel_worker.py", 2, ["--model", name, "--num-subnets", "2", "--rounds", "2", "--local-steps",
                                           "2", "--accum", "1", "--recompute-bn", "2", "--out", str(tmp_path),
                                           "--dtype", "float64"], env={"HF_HUB_OFFLINE": "1"})
    assert (tmp_path / "global.pt").exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    got = torch.load(tmp_path / "global.pt")
    model = make_model(name, torch.float64)
    model.load_state_dict(got["global"])  # exported: the evaluation view folded into the weights
    union = [batch_for(name, 20 + r, 0, k, torch.float64)[0] + r for r in range(2) for k in range(2)]
    xs = torch.stack([x for x, _ in eval_items(name, torch.float64)])
    recompute_batchnorm(model, union)
    with torch.no_grad():
        expected = model(xs)
    torch.testing.assert_close(got["logits_bn"], expected, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(got["logits_bn"], got["logits"], atol=1e-4)  # the statistics mattered
    torch.testing.assert_close(got["logits_after"], got["logits"], rtol=0, atol=0)
