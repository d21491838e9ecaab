"""benchmarks/batchnorm_reestimate.py: the re-estimated statistics are the batches' own."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from ist_accel.models import MLP

ROOT = Path(__file__).resolve().parent.parent


def test_reestimated_statistics_are_the_average_of_the_batch_statistics():
    spec = importlib.util.spec_from_file_location("batchnorm_reestimate", ROOT / "benchmarks" / "batchnorm_reestimate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    model = MLP(4, [8], 3, norm="batch")
    data = TensorDataset(torch.randn(10, 4), torch.zeros(10, dtype=torch.long))
    with torch.no_grad():
        pre = model[1](data.tensors[0])  # the first Linear's outputs, what the norm sees
    norm = model[2]
    bench.reestimate(model, data, batches=1, batch_size=10, seed=3)  # one batch: the whole set
    torch.testing.assert_close(norm.running_mean, pre.mean(0))
    torch.testing.assert_close(norm.running_var, pre.var(0))  # unbiased, as BatchNorm keeps it
    assert norm.momentum is None and not norm.training and not model.training
    bench.reestimate(model, data, batches=2, batch_size=5, seed=3)  # two halves: the average of their means
    torch.testing.assert_close(norm.running_mean, pre.mean(0))
    assert int(norm.num_batches_tracked) == 2


def test_a_run_of_another_recipe_is_refused_by_name(tmp_path):
    spec = importlib.util.spec_from_file_location("batchnorm_reestimate", ROOT / "benchmarks" / "batchnorm_reestimate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (tmp_path / "command.json").write_text('["python", "recipes/lm_recipe.py", "--seed", "0"]')
    with pytest.raises(SystemExit, match=r"runs lm_recipe.py; accepted: ist_mlp.py or resist_cifar.py"):
        bench.main([str(tmp_path)])
    assert bench._flag(["--arch", "a", "--arch", "b"], "--arch", "c") == "b"  # the value argparse keeps
