"""SyntheticShapes: a procedurally generated image classification set that needs no download.

Each class is a shape or pattern family (circle, square, triangle, ...) drawn at a random
position, scale and small rotation, in a random colour on a random, shaded background,
with a few occluding clutter rectangles and additive Gaussian noise (mean colour alone is
at chance). Every image depends only on ``(seed, split, index)``, so
train and test sets are reproducible and come from disjoint random streams.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["CLASS_NAMES", "SYNTHETIC_MEAN", "SYNTHETIC_STD", "SyntheticShapes", "make_synthetic_splits"]

logger = logging.getLogger(__name__)

CLASS_NAMES: list[str] = [
    "circle",
    "square",
    "triangle",
    "cross",
    "horizontal_stripes",
    "vertical_stripes",
    "diagonal_stripes",
    "checkerboard",
    "ring",
    "dots",
]
SYNTHETIC_MEAN = 0.5
SYNTHETIC_STD = 0.25
_NOISE_STD = 0.15


def _mask(label: int, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray:
    """Boolean foreground mask of class ``label`` in local coordinates (shape spans about [-1, 1])."""
    box = np.maximum(np.abs(u), np.abs(v)) <= 1.0
    name = CLASS_NAMES[label]
    if name == "circle":
        return u**2 + v**2 <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if name == "triangle":
        return (v >= -0.9) & (v <= 0.8) & (np.abs(u) <= (v + 0.9) * 0.55)
    if name == "cross":
        return ((np.abs(u) <= 0.25) & (np.abs(v) <= 0.9)) | ((np.abs(v) <= 0.25) & (np.abs(u) <= 0.9))
    if name == "horizontal_stripes":
        return box & (np.sin(np.pi * freq * v) > 0)
    if name == "vertical_stripes":
        return box & (np.sin(np.pi * freq * u) > 0)
    if name == "diagonal_stripes":
        return box & (np.sin(np.pi * freq * (u + v) / np.sqrt(2)) > 0)
    if name == "checkerboard":
        return box & (np.sin(np.pi * freq * u) * np.sin(np.pi * freq * v) > 0)
    if name == "ring":
        r2 = u**2 + v**2
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    # dots: a grid of small discs
    fu, fv = (u * freq / 2) % 1.0 - 0.5, (v * freq / 2) % 1.0 - 0.5
    return box & (fu**2 + fv**2 <= 0.3**2)


def _render(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Draw one uint8 image (3, size, size) of class ``label``."""
    scale = rng.uniform(0.2, 0.45) * size
    cx, cy = rng.uniform(0.3 * size, 0.7 * size, size=2)
    theta = rng.uniform(-0.25, 0.25)
    freq = rng.uniform(2.0, 3.5)
    fg = rng.uniform(0.0, 1.0, size=3)
    bg = rng.uniform(0.0, 1.0, size=3)
    while np.abs(fg - bg).mean() < 0.2:
        bg = rng.uniform(0.0, 1.0, size=3)
    gradient = rng.uniform(-0.3, 0.3, size=2)

    coords = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    dx, dy = (xx - cx) / scale, (yy - cy) / scale
    cos, sin = np.cos(theta), np.sin(theta)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    mask = _mask(label, u, v, freq)[None]

    shade = gradient[0] * (xx / size - 0.5) + gradient[1] * (yy / size - 0.5)
    image = np.where(mask, fg[:, None, None], bg[:, None, None] + shade[None])
    for _ in range(rng.integers(0, 4)):  # occluding clutter: small random-coloured rectangles
        h, w = rng.integers(2, max(3, size // 6), size=2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        image[:, y : y + h, x : x + w] = rng.uniform(0.0, 1.0, size=(3, 1, 1))
    image = image + rng.normal(0.0, _NOISE_STD, size=image.shape)
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


class SyntheticShapes(Dataset):
    """``num_samples`` images of ``num_classes`` shape families; items are (float 3xHxW, int label).

    Labels cycle through the classes (``index % num_classes``), so every class is equally
    represented. Images are pre-generated as uint8 (``self.images``, N x 3 x H x W) and
    normalized with ``SYNTHETIC_MEAN``/``SYNTHETIC_STD`` on access.
    """

    def __init__(
        self,
        num_samples: int,
        image_size: int = 32,
        num_classes: int = 10,
        seed: int = 0,
        train: bool = True,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not 2 <= num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be in [2, {len(CLASS_NAMES)}], got {num_classes}")
        if num_samples < 1 or image_size < 8:
            raise ValueError(f"need num_samples >= 1 and image_size >= 8, got {num_samples}, {image_size}")
        self.num_classes = num_classes
        self.classes = CLASS_NAMES[:num_classes]
        self.transform = transform
        split = 0 if train else 1
        labels = np.arange(num_samples) % num_classes
        images = np.empty((num_samples, 3, image_size, image_size), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i] = _render(np.random.default_rng([seed, split, i]), int(label), image_size)
        self.images = torch.from_numpy(images)
        self.targets = torch.from_numpy(labels).long()
        logger.debug("generated %d synthetic %s images", num_samples, "train" if train else "test")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = (self.images[index].float() / 255.0 - SYNTHETIC_MEAN) / SYNTHETIC_STD
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def make_synthetic_splits(
    train_size: int = 10000, test_size: int = 2000, image_size: int = 32, seed: int = 0, num_classes: int = 10
) -> tuple[SyntheticShapes, SyntheticShapes]:
    """Return (train, test) SyntheticShapes drawn from disjoint random streams of ``seed``."""
    train = SyntheticShapes(train_size, image_size, num_classes, seed=seed, train=True)
    test = SyntheticShapes(test_size, image_size, num_classes, seed=seed, train=False)
    return train, test
