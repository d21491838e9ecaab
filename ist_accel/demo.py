"""The quick-start job: a short ResIST training on the embedded synthetic image set.

No download: images are drawn procedurally (``ist_accel.data.SyntheticShapes``). The
S subnets are trained by the single-process reference engine, one after another, so
the job runs anywhere; the distributed engines train the same rounds in parallel.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from .config import ISTConfig
from .data import make_synthetic_splits
from .decompositions import decompose
from .models import build_model
from .reference import ReferenceIST

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    accuracy: float
    rounds: int
    seconds: float


def evaluate(model: nn.Module, loader: DataLoader) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return correct / max(total, 1)


def run_demo(
    arch: str = "preact_resnet20", num_subnets: int = 2, local_steps: int = 10, rounds: int = 60,
    batch_size: int = 64, lr: float = 0.05, train_size: int = 8000, seed: int = 0, progress: bool = True,
) -> DemoResult:
    """Train ``arch`` with ResIST for ``rounds`` rounds and return the global model's
    test accuracy (evaluation view: all blocks, residual scaling)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    train, test = make_synthetic_splits(train_size=train_size, test_size=2000, seed=seed)
    model = build_model(arch, num_classes=10)
    config = ISTConfig(num_subnets=num_subnets, local_steps=local_steps, seed=seed)
    d = decompose(model, config)
    engine = ReferenceIST(
        d, lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=5e-4), config.optimizer_state
    )
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    batches = iter(())
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    start = time.perf_counter()
    for _ in tqdm(range(rounds), desc="ResIST rounds", disable=not progress):
        engine.run_round([[[next_batch() for _ in range(local_steps)]] for _ in range(num_subnets)], loss_fn)
    with d.eval_view() as view:
        accuracy = evaluate(view, DataLoader(test, batch_size=256))
    return DemoResult(accuracy, rounds, time.perf_counter() - start)
