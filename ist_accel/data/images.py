"""ImageFolder trees (ImageNet layout; also CIFAR-10 stored as JPEGs) and their transforms."""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path
from typing import Any

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "cifar_transforms",
    "extract_tarball",
    "find_split_dirs",
    "imagenet_transforms",
    "load_image_folder",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
AUGMENTS = ("imagenet", "cifar", "auto")
SMALL_IMAGE_PX = 64


def find_split_dirs(root: str | Path) -> tuple[Path, Path]:
    """Return (train_dir, eval_dir) of ``root``: ``train/`` plus ``val/`` or ``test/``."""
    root = Path(root)
    train = root / "train"
    evals = [root / name for name in ("val", "test") if (root / name).is_dir()]
    if not train.is_dir() or not evals:
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else "no such folder"
        raise FileNotFoundError(f"{root}: expected a train/ folder and a val/ or test/ folder, found {found}")
    return train, evals[0]


def imagenet_transforms(image_size: int = 224, train: bool = True) -> Any:
    """Standard ImageNet transforms: RandomResizedCrop + flip (train) or Resize + CenterCrop (eval)."""
    from torchvision import transforms as T

    if train:
        head = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        head = [T.Resize(int(image_size / 0.875)), T.CenterCrop(image_size)]
    return T.Compose([*head, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def cifar_transforms(train: bool = True, image_size: int = 32) -> Any:
    """CIFAR transforms: RandomCrop(padding=4) + flip for training; normalize with CIFAR-10 mean/std."""
    from torchvision import transforms as T

    head = [T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip()] if train else []
    return T.Compose([*head, T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])


def _first_image_size(folder: Any) -> int:
    from PIL import Image

    with Image.open(folder.samples[0][0]) as image:
        return max(image.size)


def load_image_folder(
    root: str | Path, image_size: int | None = None, augment: str = "auto"
) -> tuple[Any, Any, int]:
    """Load ``root/train`` and ``root/val`` (or ``test``) as ImageFolders: (train_ds, eval_ds, num_classes).

    ``augment="auto"`` uses CIFAR transforms when the first image is at most 64 px, else ImageNet ones.
    ``image_size`` defaults to 224 (ImageNet) or 32 (CIFAR).
    """
    from torchvision.datasets import ImageFolder

    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {list(AUGMENTS)}, got {augment!r}")
    train_dir, eval_dir = find_split_dirs(root)
    train_ds, eval_ds = ImageFolder(str(train_dir)), ImageFolder(str(eval_dir))
    if train_ds.classes != eval_ds.classes:
        raise ValueError(
            f"{root}: train and eval class folders differ "
            f"({len(train_ds.classes)} vs {len(eval_ds.classes)} classes)"
        )
    if augment == "auto":
        augment = "cifar" if _first_image_size(train_ds) <= SMALL_IMAGE_PX else "imagenet"
    if augment == "cifar":
        size = image_size or 32
        train_ds.transform = cifar_transforms(train=True, image_size=size)
        eval_ds.transform = cifar_transforms(train=False, image_size=size)
    else:
        size = image_size or 224
        train_ds.transform = imagenet_transforms(size, train=True)
        eval_ds.transform = imagenet_transforms(size, train=False)
    logger.info(
        "loaded %s: %d train / %d eval images, %d classes, %s transforms at %d px",
        root, len(train_ds), len(eval_ds), len(train_ds.classes), augment, size,
    )
    return train_ds, eval_ds, len(train_ds.classes)


def _split_root(dest: Path) -> Path | None:
    """``dest`` or its single sub-folder, whichever holds ``train/``."""
    if (dest / "train").is_dir():
        return dest
    subdirs = [p for p in dest.iterdir() if p.is_dir() and (p / "train").is_dir()]
    return subdirs[0] if len(subdirs) == 1 else None


def extract_tarball(tar_path: str | Path, dest: str | Path) -> Path:
    """Extract ``tar_path`` into ``dest`` once (a marker file records completion); return the split root."""
    tar_path, dest = Path(tar_path), Path(dest)
    if not tar_path.is_file():
        raise FileNotFoundError(f"no such tarball: {tar_path}")
    marker = dest / f".{tar_path.name}.extracted"
    if not marker.exists():
        dest.mkdir(parents=True, exist_ok=True)
        logger.info("extracting %s into %s", tar_path, dest)
        with tarfile.open(tar_path, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # Python < 3.10.12 / 3.11.4: refuse absolute or escaping member paths ourselves
                for member in tar.getmembers():
                    target = (dest / member.name).resolve()
                    if not target.is_relative_to(dest.resolve()) or member.issym() or member.islnk():
                        raise ValueError(f"{tar_path}: unsafe member {member.name!r}")
                tar.extractall(dest)
        marker.touch()
    root = _split_root(dest)
    if root is None:
        raise FileNotFoundError(f"{tar_path}: extracted into {dest}, but found no folder holding train/")
    return root
