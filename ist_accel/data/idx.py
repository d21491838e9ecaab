"""MNIST-style idx files (plain or gzip-compressed)."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["MNIST_MEAN", "MNIST_STD", "IdxDataset", "load_mnist", "read_idx"]

logger = logging.getLogger(__name__)

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# idx type byte -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if not gzipped:
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from e


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) into a native-endian numpy array."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number {data[:4].hex() or 'empty'})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated idx header ({len(data)} bytes, expected {header})")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "oversized"
        raise ValueError(
            f"{path}: {kind} idx file ({len(data)} bytes, expected {expected} for shape {shape})"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


class IdxDataset(Dataset):
    """Images and labels from a pair of idx files; items are (float 1xHxW, int label)."""

    def __init__(self, images_path: str | Path, labels_path: str | Path, normalize: bool = True) -> None:
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{images_path} / {labels_path}: expected N x H x W images and N labels, "
                f"got shapes {images.shape} and {labels.shape}"
            )
        self.images = torch.from_numpy(images.copy())
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.normalize = normalize
        self.classes = [str(c) for c in range(int(self.targets.max()) + 1)] if len(labels) else []

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().unsqueeze(0) / 255.0
        if self.normalize:
            image = (image - MNIST_MEAN) / MNIST_STD
        return image, int(self.targets[index])


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def load_mnist(root: str | Path, normalize: bool = True) -> tuple[IdxDataset, IdxDataset]:
    """Load (train, test) MNIST from a folder of ``train-*``/``t10k-*`` idx files (``.gz`` or plain)."""
    root = Path(root)
    kinds = ("images-idx3-ubyte", "labels-idx1-ubyte")
    stems = [f"{split}-{kind}" for split in ("train", "t10k") for kind in kinds]
    paths = {stem: _find(root, stem) for stem in stems}
    missing = [stem for stem, path in paths.items() if path is None]
    if missing:
        raise FileNotFoundError(f"MNIST files missing in {root}: {', '.join(s + '[.gz]' for s in missing)}")
    train = IdxDataset(paths[stems[0]], paths[stems[1]], normalize)
    test = IdxDataset(paths[stems[2]], paths[stems[3]], normalize)
    logger.info("loaded MNIST from %s: %d train, %d test", root, len(train), len(test))
    return train, test
