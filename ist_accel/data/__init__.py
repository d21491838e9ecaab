"""Data sets: an embedded synthetic set, MNIST idx files and ImageFolder trees."""

from .idx import MNIST_MEAN, MNIST_STD, IdxDataset, load_mnist, read_idx
from .images import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    cifar_transforms,
    extract_tarball,
    find_split_dirs,
    imagenet_transforms,
    load_hf_image_dataset,
    load_image_data,
    load_image_folder,
)
from .synthetic import CLASS_NAMES, SyntheticShapes, make_synthetic_splits

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CLASS_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "IdxDataset",
    "SyntheticShapes",
    "cifar_transforms",
    "extract_tarball",
    "find_split_dirs",
    "imagenet_transforms",
    "load_hf_image_dataset",
    "load_image_data",
    "load_image_folder",
    "load_mnist",
    "make_synthetic_splits",
    "read_idx",
]
