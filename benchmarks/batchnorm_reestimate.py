"""Issue 17, item 4: does re-estimating BatchNorm statistics of the global model before
evaluation close IST's accuracy gap? Offline, on a finished ``recipes/ist_mlp.py`` (MNIST MLP)
or ``recipes/resist_cifar.py`` (CIFAR pre-activation ResNet) run.

The exported model (the global model in its evaluation view, ``output_dir/model``) is loaded
into the plain model the run's command names; its BatchNorm running statistics are recomputed
as a cumulative average over ``--batches`` seeded training batches (the global model's
activations differ from any subnet's, whose statistics the average holds; images with the
recipe's training augmentation, as the statistics were gathered), then scored on the split the
run scored (``--val-split`` held-out part or the test set), against the statistics as saved.

    python benchmarks/batchnorm_reestimate.py runs/ist_seed0 --batches 10 40
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ist_accel.data import load_image_data, load_mnist
from ist_accel.models import MLP, build_model
from ist_accel.sharded import load_folder
from ist_accel.recipe import held_out_split


def _flag(command: list[str], name: str, default: str | None) -> str | None:
    """The value argparse keeps: the last ``name`` given, as ``name value`` or ``name=value``
    (compare.py's extra flags come last; its ``--ist-args`` pass the ``=`` form)."""
    found = default
    for i, a in enumerate(command):
        if a == name and i + 1 < len(command):
            found = command[i + 1]
        elif a.startswith(name + "="):
            found = a[len(name) + 1:]
    return found


def accuracy(model: nn.Module, data) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(data, batch_size=1000):
            correct += int((model(x).argmax(-1) == y).sum())
    return correct / len(data)


def reestimate(model: nn.Module, data, batches: int, batch_size: int, seed: int) -> None:
    """Recompute every BatchNorm's running statistics over ``batches`` training batches (only
    the norms in train mode: dropout stays off)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
        m.train()
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            if i == batches:
                break
            model(x)
    model.eval()


def load_run(run: Path) -> tuple[list[str], nn.Module, dict, object, object]:
    """(command, plain model, exported state, training set, scored split) of a finished
    ``ist_mlp.py`` or ``resist_cifar.py`` run: the split is the run's ``--val-split`` held-out
    part, read through the test set's transform, or the test set."""
    command = json.loads((run / "command.json").read_text())
    seed, val = int(_flag(command, "--seed", "0")), float(_flag(command, "--val-split", "0"))
    recipe = next((Path(a).name for a in command if a.endswith(".py")), "")
    if recipe == "resist_cifar.py":
        train, test, num_classes, _ = load_image_data(_flag(command, "--data", None), 32, "cifar",
                                                      _flag(command, "--data-cache", None), seed)
        model = build_model(_flag(command, "--arch", "preact_resnet101"), num_classes=num_classes)
    elif recipe == "ist_mlp.py":
        hidden = [1024, 1024]  # the recipe's default
        if "--hidden" in command:
            rest = command[command.index("--hidden") + 1:]
            hidden = [int(h) for h in rest[:next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]]
        train, test = load_mnist(_flag(command, "--data", "../shared/datasets/mnist"))
        model = MLP(784, hidden, 10, norm="batch")
    else:
        raise SystemExit(f"{run}: its command.json runs {recipe or 'no recipe'}; "
                         "accepted: ist_mlp.py or resist_cifar.py runs")
    if val:  # the recipe's own held-out split
        train, test = held_out_split(train, val, seed, test)
    return command, model, load_folder(run / "model"), train, test


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="an ist_mlp.py or resist_cifar.py output folder (command.json, model/)")
    p.add_argument("--batches", type=int, nargs="+", default=[10, 40])
    args = p.parse_args(argv)
    command, model, saved, train, test = load_run(args.run)
    seed, val = int(_flag(command, "--seed", "0")), float(_flag(command, "--val-split", "0"))
    model.load_state_dict(saved)
    out = {"run": str(args.run), "split": "held-out train" if val else "test", "as_saved": accuracy(model, test)}
    for n in args.batches:
        model.load_state_dict(saved)
        reestimate(model, train, n, int(_flag(command, "--batch-size", "128")), seed + 1)
        out[f"reestimated_{n}"] = accuracy(model, test)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
