#!/usr/bin/env python
"""IST on a fully connected network (Yuan et al., arXiv 1910.02120, Sec. 3-4).

Every round each hidden layer's neurons are shuffled and split into S disjoint parts;
worker s trains the rows of its neurons in the layer into them and the columns in the
layer out of them, for ``--local-steps`` steps with no communication. Data: MNIST-style
idx files (``train-images-idx3-ubyte[.gz]`` ...), or any ImageFolder root / tarball
(images are flattened).

    accelerate launch --config_file launch_configs/cpu.yaml recipes/ist_mlp.py \\
        --data ../shared/datasets/mnist --num-subnets 2 --epochs 2 --output-dir out
"""

import argparse
from pathlib import Path

from ist_accel.data import load_image_data, load_mnist
from ist_accel.models import MLP
from accelerate.utils import set_seed

from ist_accel.recipe import (add_training_args, check_args, data_errors, finish, model_context, setup_logging,
                                train_classifier)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = parser.add_argument_group("data and model")
    d.add_argument("--data", required=True, help="folder of idx files (MNIST layout), or an ImageFolder root/tarball; "
                   "{rank}/{node} in it: each rank reads its own (node-local data)")
    d.add_argument("--data-cache", default=None, help="where a tarball is extracted (default: a temp folder)")
    d.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024], help="hidden layer widths")
    d.add_argument("--norm", choices=("batch", "layer", "none"), default="batch")
    d.add_argument("--dropout", type=float, default=0.0)
    add_training_args(parser, epochs=2, lr=0.05, weight_decay=0.0, batch_size=128, local_steps=20,
                      schedule="constant", decomposition="ist_mlp")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def main() -> None:
    setup_logging()
    args = parse_args()
    set_seed(args.seed)  # the same initial model in every rank and every run
    with data_errors():  # a wrong layout or unreadable files: one line, before any process group
        if any(Path(args.data).glob("train-images-idx3-ubyte*")):
            train_set, eval_set = load_mnist(args.data)
            num_classes = 10
        else:
            train_set, eval_set, num_classes, _ = load_image_data(args.data, augment="cifar", cache=args.data_cache,
                                                                     classes=args.classes)
    in_features = train_set[0][0].numel()
    with model_context(args):  # --init meta: no rank builds the whole model (IST materializes its pieces)
        model = MLP(in_features, args.hidden, num_classes, norm=None if args.norm == "none" else args.norm,
                    dropout=args.dropout)
    train_classifier(args, model, train_set, eval_set)
    finish()


if __name__ == "__main__":
    main()
