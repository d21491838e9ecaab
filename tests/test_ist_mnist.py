"""IST on real MNIST (reference engine): it learns, and the evaluation view's 1/S input
scaling of cut layers is what makes the BatchNorm MLP's global model accurate."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from ist_accel import ISTConfig, ReferenceIST, decompose
from ist_accel.data import load_mnist
from ist_accel.models import MLP

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist"


@pytest.mark.long
@pytest.mark.skipif(not MNIST.exists(), reason=f"real data not found at {MNIST} (../shared beside the repo)")
def test_ist_mlp_learns_mnist_and_eval_scaling_matters():
    torch.manual_seed(0)
    train, test = load_mnist(MNIST)
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([test[i][1] for i in range(len(test))])
    model = MLP(784, [1024, 1024], 10, norm="batch")
    d = decompose(model, ISTConfig(num_subnets=2, local_steps=20))
    engine = ReferenceIST(d, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    loader = DataLoader(train, batch_size=128, shuffle=True, drop_last=True)
    batches = (b for _ in range(2) for b in loader)  # two epochs, reshuffled each
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    for _ in range(20):  # 20 rounds x 20 steps x 2 subnets x 128 = 1.7 epochs of samples (12 s; 40 rounds: 0.980)
        engine.run_round([[[next(batches) for _ in range(20)]] for _ in range(2)], loss)
    accuracy = {}
    for scaled in (True, False):
        d.eval_scaling = scaled
        with d.eval_view() as view, torch.no_grad():
            accuracy[scaled] = (view(x).argmax(1) == y).float().mean().item()
    assert accuracy[True] >= 0.95, accuracy  # measured 0.972
    assert accuracy[True] > accuracy[False] + 0.02, accuracy  # measured 0.935 unscaled
