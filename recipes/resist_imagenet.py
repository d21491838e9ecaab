#!/usr/bin/env python
"""ResIST on ImageNet-style image classification (Dun et al., arXiv 2107.00961, Sec. 4).

Data: an ImageFolder tree (``train/`` and ``val/`` or ``test/``, a folder per class), a
``.tar.gz`` of one, a ``datasets`` image set (hub name or ``save_to_disk`` folder), or
with no ``--data`` the embedded synthetic set. Model: a ResNet-50/101/152 (own
pre-activation ``preact_resnet*`` or torchvision ``resnet*``). Schedule: the paper's SGD
(momentum 0.9, weight decay 1e-4, lr divided by 10 at 1/3, 2/3 and 8/9 of training),
optionally after data-parallel warm-up epochs. ``--method ddp|localsgd`` runs the baselines.

    accelerate launch --config_file launch_configs/cpu.yaml recipes/resist_imagenet.py \\
        --data ../shared/datasets/cifar10-jpeg.tar.gz --arch preact_resnet20 --num-subnets 2 \\
        --batch-size 64 --max-steps 300 --output-dir out
"""

import argparse

from ist_accel.data import load_hf_image_dataset, load_image_data
from ist_accel.models import MODEL_NAMES, build_model
from accelerate.utils import set_seed

from ist_accel.recipe import add_training_args, check_args, data_errors, finish, setup_logging, train_classifier


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = parser.add_argument_group("data and model")
    d.add_argument("--data", default=None, help="ImageFolder root or .tar.gz of one (default: embedded synthetic set); "
                   "{rank}/{node} in it: each rank reads its own (node-local data)")
    d.add_argument("--dataset-name", default=None, help="a `datasets` image set: hub name or save_to_disk folder")
    d.add_argument("--data-cache", default=None, help="where a tarball is extracted (default: a temp folder)")
    d.add_argument("--image-size", type=int, default=None, help="default 224, or 32 for small images")
    d.add_argument("--augment", choices=("auto", "imagenet", "cifar"), default="auto")
    d.add_argument("--arch", default="preact_resnet101", help=f"one of {', '.join(MODEL_NAMES)} or timm:<name>")
    d.add_argument("--stem", choices=("auto", "imagenet", "cifar"), default="auto",
                   help="stem of preact_resnet18-152 (auto: imagenet for images above 64 px)")
    add_training_args(parser, epochs=90, lr=0.1, weight_decay=1e-4, milestones=[1 / 3, 2 / 3, 8 / 9],
                      batch_size=64, local_steps=50)
    args = parser.parse_args(argv)
    check_args(args)
    return args


def main() -> None:
    setup_logging()
    args = parse_args()
    set_seed(args.seed)  # the same initial model in every rank and every run
    with data_errors():  # a wrong layout or unreadable files: one line, before any process group
        if args.dataset_name:
            train_set, eval_set, num_classes, size = load_hf_image_dataset(args.dataset_name, args.image_size,
                                                                           args.augment)
        else:
            train_set, eval_set, num_classes, size = load_image_data(args.data, args.image_size, args.augment,
                                                                     args.data_cache, seed=args.seed, classes=args.classes)
    stem = None
    if args.arch.removeprefix("preact_resnet") in ("18", "34", "50", "101", "152"):
        stem = args.stem if args.stem != "auto" else ("imagenet" if size > 64 else "cifar")
    model = build_model(args.arch, num_classes=num_classes, stem=stem)
    train_classifier(args, model, train_set, eval_set)
    finish()


if __name__ == "__main__":
    main()
