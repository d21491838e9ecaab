"""Tests for ist_accel.data: synthetic shapes, MNIST idx files and ImageFolder trees."""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ist_accel.data import (
    CLASS_NAMES,
    SyntheticShapes,
    cifar_transforms,
    extract_tarball,
    find_split_dirs,
    imagenet_transforms,
    load_image_folder,
    load_mnist,
    make_synthetic_splits,
    read_idx,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
MNIST_DIR = SHARED / "mnist"
CIFAR_TAR = SHARED / "cifar10-jpeg.tar.gz"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --- synthetic -------------------------------------------------------------------------------


def test_synthetic_deterministic_and_disjoint() -> None:
    a, b = SyntheticShapes(50, seed=3), SyntheticShapes(50, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert torch.equal(SyntheticShapes(20, seed=3).images, a.images[:20])  # index-wise determinism
    assert not torch.equal(SyntheticShapes(50, seed=4).images, a.images)
    test = SyntheticShapes(50, seed=3, train=False)
    assert not any(torch.equal(x, y) for x in a.images for y in test.images)


def test_synthetic_items_and_classes() -> None:
    train, test = make_synthetic_splits(train_size=200, test_size=30, image_size=24)
    assert (len(train), len(test)) == (200, 30)
    image, label = train[7]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and isinstance(label, int)
    assert set(train.targets.tolist()) == set(range(10)) == set(test.targets.tolist())
    assert train.classes == CLASS_NAMES
    stacked = torch.stack([train[i][0] for i in range(len(train))])
    assert -0.5 < stacked.mean().item() < 0.5 and 0.7 < stacked.std().item() < 1.6


def test_synthetic_not_separable_by_colour() -> None:
    train, test = make_synthetic_splits(train_size=1000, test_size=500)
    colour_train = train.images.float().mean((2, 3))
    colour_test = test.images.float().mean((2, 3))
    centroids = torch.stack([colour_train[train.targets == c].mean(0) for c in range(10)])
    predicted = torch.cdist(colour_test, centroids).argmin(1)
    assert (predicted == test.targets).float().mean().item() < 0.25  # chance is 0.1


def test_synthetic_validation() -> None:
    assert set(SyntheticShapes(8, num_classes=4).targets.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticShapes(10, num_classes=11)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run single-threaded: robust timing when other processes share the (2) cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_synthetic_is_learnable(one_thread: None) -> None:
    torch.manual_seed(0)
    start = time.monotonic()
    train, test = make_synthetic_splits(train_size=2000, test_size=500)
    x_train = torch.stack([train[i][0] for i in range(len(train))])
    x_test = torch.stack([test[i][0] for i in range(len(test))])
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    epochs, batch = 8, 50
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 5e-3, total_steps=epochs * len(train) // batch)
    for _ in range(epochs):
        for idx in torch.randperm(len(train)).split(batch):
            loss = nn.functional.cross_entropy(model(x_train[idx]), train.targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == test.targets).float().mean().item()
    elapsed = time.monotonic() - start
    assert accuracy > 0.5, f"test accuracy {accuracy:.3f} after {elapsed:.1f}s (chance is 0.1)"


# --- idx / MNIST -----------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray, type_byte: int = 0x08) -> bytes:
    dims = np.array(array.shape, dtype=">u4").tobytes()
    return bytes([0, 0, type_byte, array.ndim]) + dims + array.tobytes()


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a-idx3-ubyte").write_bytes(_idx_bytes(images))
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), images)
    ints = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "b.idx").write_bytes(_idx_bytes(ints, 0x0C))
    out = read_idx(tmp_path / "b.idx")
    assert out.dtype == np.int32 and out.tolist() == [1, -2, 70000]


def test_read_idx_errors_name_the_file(tmp_path: Path) -> None:
    good = _idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    cases = {
        "truncated-idx3-ubyte": good[:-10],
        "header-idx3-ubyte": good[:6],
        "magic-idx3-ubyte": b"\x12\x34" + good[2:],
        "empty-idx3-ubyte": b"",
        "truncated.gz": gzip.compress(good)[:-20],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name):
            read_idx(tmp_path / name)


def test_load_mnist_missing_files(tmp_path: Path) -> None:
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*t10k-labels-idx1-ubyte") as info:
        load_mnist(tmp_path)
    assert "train-labels" not in str(info.value)


def test_load_real_mnist() -> None:
    if not MNIST_DIR.is_dir():
        pytest.skip(f"real MNIST not found at {MNIST_DIR} (expected ../shared/datasets next to the repo)")
    train, test = load_mnist(MNIST_DIR)
    assert (len(train), len(test)) == (60000, 10000)
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == 5
    assert train.targets.min() == 0 and train.targets.max() == 9 and test.targets.max() == 9
    assert torch.bincount(test.targets).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    mean = (train.images.float() / 255).mean().item()
    assert abs(mean - 0.1307) < 1e-3
    assert abs(torch.stack([train[i][0] for i in range(1000)]).mean().item()) < 0.1


# --- ImageFolder trees -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def cifar_root(cifar_cache: Path) -> Path:
    """The CIFAR-10 JPEG tree, extracted once per session (conftest.py)."""
    return extract_tarball(CIFAR_TAR, cifar_cache / "cifar10-jpeg")


def test_cifar_image_folder(cifar_root: Path) -> None:
    assert find_split_dirs(cifar_root) == (cifar_root / "train", cifar_root / "test")
    train, test, num_classes = load_image_folder(cifar_root)
    assert (len(train), len(test), num_classes) == (50000, 10000, 10)
    assert train.classes == CIFAR_CLASSES and train.class_to_idx["airplane"] == 0
    assert train.class_to_idx["truck"] == 9 and test.classes == CIFAR_CLASSES
    image, label = train[0]
    assert image.shape == (3, 32, 32) and label == 0
    image, label = test[len(test) - 1]
    assert image.shape == (3, 32, 32) and label == 9
    assert "RandomCrop" in repr(train.transform) and "RandomCrop" not in repr(test.transform)


def test_extract_tarball_is_idempotent(cifar_root: Path) -> None:
    start = time.monotonic()
    assert extract_tarball(CIFAR_TAR, cifar_root) == cifar_root
    assert time.monotonic() - start < 1.0


def test_transforms_on_cifar_image(cifar_root: Path) -> None:
    from PIL import Image

    with Image.open(next((cifar_root / "train" / "cat").iterdir())) as image:
        image = image.convert("RGB")
        for train in (True, False):
            assert cifar_transforms(train)(image).shape == (3, 32, 32)
            assert imagenet_transforms(64, train)(image).shape == (3, 64, 64)
    _, test, _ = load_image_folder(cifar_root, image_size=48, augment="imagenet")
    assert test[0][0].shape == (3, 48, 48)


def test_auto_augment_picks_imagenet_for_large_images(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("b_class", "a_class"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (96, 80), (10, 200, 30)).save(tmp_path / split / cls / "0.png")
    train, val, num_classes = load_image_folder(tmp_path, image_size=64)
    assert num_classes == 2 and train.classes == ["a_class", "b_class"]
    assert "RandomResizedCrop" in repr(train.transform)
    assert train[0][0].shape == val[0][0].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="augment"):
        load_image_folder(tmp_path, augment="mnist")


def test_find_split_dirs_errors(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="val/ or test/"):
        find_split_dirs(tmp_path)
    (tmp_path / "val").mkdir()
    assert find_split_dirs(tmp_path) == (tmp_path / "train", tmp_path / "val")
    with pytest.raises(FileNotFoundError, match="no such tarball"):
        extract_tarball(tmp_path / "missing.tar.gz", tmp_path / "out")


def test_held_out_split_scores_training_images_as_the_test_set_is(tmp_path: Path) -> None:
    """--val-split on an image folder: the held-out images go through the eval transform (no
    random crop or flip: the same tensor every time), the rest keep the training augmentation."""
    from PIL import Image

    from ist_accel.recipe import held_out_split

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(5):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    train, test, _ = load_image_folder(tmp_path)
    rest, held = held_out_split(train, 0.3, seed=1, eval_set=test)
    assert (len(rest), len(held)) == (7, 3) and not set(rest.indices) & set(held.indices)
    for i, index in enumerate(held.indices):
        path, label = train.samples[index]
        with Image.open(path) as image:
            expected = test.transform(image.convert("RGB"))
        torch.manual_seed(i)
        first = held[i][0]
        torch.manual_seed(i + 100)
        assert torch.equal(first, held[i][0]) and torch.equal(first, expected) and held[i][1] == label
    assert rest.dataset is train and "RandomCrop" in repr(train.transform)  # training keeps its augmentation
    draws = {tuple(rest[0][0].flatten()[:64].tolist()) for _ in range(8)}
    assert len(draws) > 1  # a random crop or flip: the training side still augments
    assert held_out_split(train, 0.3, seed=1)[1].dataset is train  # no eval set given: as before


def test_eval_samples_spread_over_a_class_sorted_folder(tmp_path: Path) -> None:
    """--eval-samples on an ImageFolder (sorted by class): the subset covers every class, evenly,
    where the first N items would be the first classes only."""
    from PIL import Image

    from ist_accel.recipe import evenly_spaced

    for cls in "abcd":
        (tmp_path / "test" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(tmp_path / "test" / cls / f"{i}.png")
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "train" / cls / "0.png")
    test = load_image_folder(tmp_path)[1]
    subset = evenly_spaced(test, 8)
    assert len(subset) == 8 and sorted(test.targets[i] for i in subset.indices) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(evenly_spaced(test, 100)) == 24  # more than the set: all of it, once
