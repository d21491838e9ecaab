#!/usr/bin/env python
"""ResIST on CIFAR-10/100: the paper's setting (Dun et al., arXiv 2107.00961, Sec. 4.1).

Pre-activation ResNet-101, S = 2, 4 or 8 subnets, 50 local iterations, batch 128 per
worker, SGD momentum 0.9, weight decay 5e-4, lr 0.03 divided by 10 at 50% and 75% of
training. Data: an ImageFolder of CIFAR (``train/``, ``test/``; e.g. the extracted
``cifar10-jpeg.tar.gz``), the tarball itself, a ``datasets`` set, or the embedded
synthetic set when none is given. ``--method ddp|localsgd`` runs the baselines.

    accelerate launch --config_file launch_configs/one_node_8gpu.yaml recipes/resist_cifar.py \\
        --data cifar10/ --num-subnets 8 --epochs 160 --report-to wandb
"""

import argparse

from ist_accel.data import load_hf_image_dataset, load_image_data
from ist_accel.models import build_model
from accelerate.utils import set_seed

from ist_accel.recipe import add_training_args, check_args, data_errors, finish, setup_logging, train_classifier

ARCHS = ("preact_resnet18", "preact_resnet34", "preact_resnet50", "preact_resnet101", "preact_resnet152",
         "preact_resnet20", "preact_resnet32", "preact_resnet56", "preact_resnet110")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = parser.add_argument_group("data and model")
    d.add_argument("--data", default=None, help="CIFAR ImageFolder root or tarball (default: embedded synthetic set); "
                   "{rank}/{node} in it: each rank reads its own (node-local data)")
    d.add_argument("--dataset-name", default=None, help="a `datasets` image set: hub name or save_to_disk folder")
    d.add_argument("--data-cache", default=None, help="where a tarball is extracted (default: a temp folder)")
    d.add_argument("--arch", choices=ARCHS, default="preact_resnet101")
    add_training_args(parser, epochs=160, lr=0.03, weight_decay=5e-4, milestones=[0.5, 0.75], batch_size=128,
                      local_steps=50, decomposition="resist")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def main() -> None:
    setup_logging()
    args = parse_args()
    set_seed(args.seed)  # the same initial model in every rank and every run
    with data_errors():  # a wrong layout or unreadable files: one line, before any process group
        if args.dataset_name:
            train_set, eval_set, num_classes, _ = load_hf_image_dataset(args.dataset_name, 32, "cifar")
        else:
            train_set, eval_set, num_classes, _ = load_image_data(args.data, 32, "cifar", args.data_cache, args.seed,
                                                                     classes=args.classes)
    model = build_model(args.arch, num_classes=num_classes)
    train_classifier(args, model, train_set, eval_set)
    finish()


if __name__ == "__main__":
    main()
