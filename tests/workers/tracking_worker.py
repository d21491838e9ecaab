"""Runs the ist_mlp recipe's training with W&B (offline) and a capturing tracker beside it,
which writes every logged key, image and the run config to JSON."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
from accelerate.tracking import GeneralTracker

from ist_accel.data import load_mnist
from ist_accel.models import MLP
from ist_accel.recipe import finish, train_classifier

ROOT = Path(__file__).resolve().parents[2]


class Capture(GeneralTracker):
    name = "capture"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path, self.logs, self.images, self.config = path, [], [], None

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        self.config = values

    def log(self, values: dict, step=None, **kwargs) -> None:
        self.logs.append({"step": step, "values": {k: float(v) for k, v in values.items()}})

    def log_images(self, values: dict, step=None, **kwargs) -> None:
        self.images.append({"step": step, "shapes": {k: [list(np.asarray(i).shape) for i in v] for k, v in values.items()}})

    def finish(self) -> None:
        Path(self.path).write_text(json.dumps({"logs": self.logs, "images": self.images, "config": self.config}, default=str))


def main() -> None:
    spec = importlib.util.spec_from_file_location("ist_mlp", ROOT / "recipes" / "ist_mlp.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    args = recipe.parse_args(sys.argv[1:])
    train, test = load_mnist(args.data)
    model = MLP(784, args.hidden, 10, norm="batch")
    train_classifier(args, model, train, test, trackers=[Capture(str(Path(args.output_dir) / "captured.json"))])
    finish()


if __name__ == "__main__":
    main()
