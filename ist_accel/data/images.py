"""ImageFolder trees (ImageNet layout; also CIFAR-10 stored as JPEGs) and their transforms."""

from __future__ import annotations

import fcntl
import logging
import tarfile
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "ImageDecodeError",
    "load_image",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "cifar_transforms",
    "extract_tarball",
    "find_split_dirs",
    "imagenet_transforms",
    "load_hf_image_dataset",
    "load_image_data",
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


class ImageDecodeError(OSError):
    """An image file of the data set cannot be read or decoded (truncated, not an image)."""


def load_image(path: str) -> Any:
    """torchvision's image loader, with decode errors naming the file (a truncated JPEG
    otherwise fails with ``OSError: Truncated File Read`` and no path)."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except Exception as error:
        raise ImageDecodeError(f"cannot decode image {path}: {type(error).__name__}: {error}") from None


def _first_image_size(folder: Any) -> int:
    from PIL import Image

    path = folder.samples[0][0]
    try:
        with Image.open(path) as image:
            return max(image.size)
    except Exception as error:
        raise ImageDecodeError(f"cannot decode image {path}: {type(error).__name__}: {error}") from None


def _image_folder(root: Path, classes: list[str] | None = None) -> Any:
    """An ImageFolder that names its undecodable files and warns about the files it skips
    (not images by their extension). A warning, not an error: stray files in class folders
    (README, .DS_Store, Thumbs.db) are common and harmless, but a misplaced file should be
    seen, not silently dropped. ``classes``: the whole label set in label order (node-local
    data, where a node may lack some classes); a class folder outside it is an error."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    class Folder(ImageFolder):
        def find_classes(self, directory: Any) -> tuple[list[str], dict[str, int]]:
            if classes is None:
                return super().find_classes(directory)
            stray = sorted(p.name for p in Path(directory).iterdir() if p.is_dir() and p.name not in classes)
            if stray:
                raise ValueError(f"{directory}: class folder(s) {stray} are not in --classes {classes}")
            return list(classes), {name: i for i, name in enumerate(classes)}

    skipped: list[str] = []

    def is_image(path: str) -> bool:
        if has_file_allowed_extension(path, IMG_EXTENSIONS):
            return True
        skipped.append(path)
        return False

    folder = Folder(str(root), loader=load_image, is_valid_file=is_image, allow_empty=classes is not None)
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        logger.warning("%s: skipped %d file(s) that are not images (extensions %s): %s", root, len(skipped),
                       " ".join(IMG_EXTENSIONS), shown)
    return folder


def load_image_folder(
    root: str | Path, image_size: int | None = None, augment: str = "auto", classes: list[str] | None = None
) -> tuple[Any, Any, int]:
    """Load ``root/train`` and ``root/val`` (or ``test``) as ImageFolders: (train_ds, eval_ds, num_classes).
    ``classes``: the label set to map folder names to (default: the class folders found).

    ``augment="auto"`` uses CIFAR transforms when the first image is at most 64 px, else ImageNet ones.
    ``image_size`` defaults to 224 (ImageNet) or 32 (CIFAR).
    """
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {list(AUGMENTS)}, got {augment!r}")
    train_dir, eval_dir = find_split_dirs(root)
    train_ds, eval_ds = _image_folder(train_dir, classes), _image_folder(eval_dir, classes)
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
    train_ds.image_size = eval_ds.image_size = size
    logger.info(
        "loaded %s: %d train / %d eval images, %d classes, %s transforms at %d px",
        root, len(train_ds), len(eval_ds), len(train_ds.classes), augment, size,
    )
    return train_ds, eval_ds, len(train_ds.classes)


def _transforms(augment: str, image_size: int | None, native: int) -> tuple[Any, Any, int]:
    if augment == "auto":
        augment = "cifar" if native <= SMALL_IMAGE_PX else "imagenet"
    if augment == "cifar":
        size = image_size or 32
        return cifar_transforms(True, size), cifar_transforms(False, size), size
    size = image_size or 224
    return imagenet_transforms(size, True), imagenet_transforms(size, False), size


class HFImages:
    """A ``datasets`` split as (image tensor, label) items."""

    def __init__(self, split: Any, image_column: str, label_column: str, transform: Any) -> None:
        self.split, self.image_column, self.label_column, self.transform = split, image_column, label_column, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        item = self.split[index]
        return self.transform(item[self.image_column].convert("RGB")), int(item[self.label_column])


def load_hf_image_dataset(name: str, image_size: int | None = None, augment: str = "auto") -> tuple[Any, Any, int, int]:
    """A ``datasets`` image classification set (hub name, or a ``save_to_disk`` folder):
    (train, eval, num_classes, image_size). Eval is ``validation`` or ``test``; the image
    and label columns are found from the features (``Image`` and ``ClassLabel``)."""
    import datasets

    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {list(AUGMENTS)}, got {augment!r}")
    path = Path(name)
    data = datasets.load_from_disk(name) if (path / "dataset_dict.json").is_file() else datasets.load_dataset(name)
    evals = [s for s in ("validation", "test") if s in data]
    if "train" not in data or not evals:
        raise ValueError(f"{name}: need a 'train' split and a 'validation' or 'test' split, found {list(data)}")
    train, held_out = data["train"], data[evals[0]]
    features = train.features
    images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if not images or not labels:
        raise ValueError(f"{name}: need an Image and a ClassLabel column, found {dict(features)}")
    native = max(train[0][images[0]].size)
    train_tf, eval_tf, size = _transforms(augment, image_size, native)
    num_classes = features[labels[0]].num_classes
    logger.info("loaded %s: %d train / %d %s images, %d classes", name, len(train), len(held_out), evals[0], num_classes)
    return (HFImages(train, images[0], labels[0], train_tf), HFImages(held_out, images[0], labels[0], eval_tf),
            num_classes, size)


def load_image_data(
    data: str | Path | None,
    image_size: int | None = None,
    augment: str = "auto",
    cache: str | Path | None = None,
    seed: int = 0,
    classes: list[str] | None = None,
) -> tuple[Any, Any, int, int]:
    """(train, eval, num_classes, image_size) from an ImageFolder root, a tarball of one
    (extracted once into ``cache``), or, for ``None``, the embedded synthetic set;
    ``classes``: an image folder's label set (:func:`load_image_folder`)."""
    if data is None:
        from .synthetic import make_synthetic_splits

        size = image_size or 32
        train, test = make_synthetic_splits(image_size=size, seed=seed)
        return train, test, train.num_classes, size
    path = Path(data)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        stem = path.name.split(".")[0]
        path = extract_tarball(path, Path(cache or Path(tempfile.gettempdir()) / "ist_accel_data") / stem)
    train, held_out, num_classes = load_image_folder(path, image_size, augment, classes)
    return train, held_out, num_classes, train.image_size


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
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / ".lock", "w") as lock:  # several ranks may ask at once: one extracts
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            _extract(tar_path, dest)
            marker.touch()
    root = _split_root(dest)
    if root is None:
        raise FileNotFoundError(f"{tar_path}: extracted into {dest}, but found no folder holding train/")
    return root


def _extract(tar_path: Path, dest: Path) -> None:
    logger.info("extracting %s into %s", tar_path, dest)
    with tarfile.open(tar_path, "r:*") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
            return
        # Python < 3.10.12 / 3.11.4: refuse absolute or escaping member paths ourselves
        for member in tar.getmembers():
            target = (dest / member.name).resolve()
            if not target.is_relative_to(dest.resolve()) or member.issym() or member.islnk():
                raise ValueError(f"{tar_path}: unsafe member {member.name!r}")
        tar.extractall(dest)
