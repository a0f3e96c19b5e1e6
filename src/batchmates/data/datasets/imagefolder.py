"""Folders of images, decoded and resized in DataLoader workers: ``imagefolder:PATH`` (class subfolders) and
``imagefolder-unlabeled:PATH`` (any images, no labels: self-supervised pretraining).

Library choices: ``PATH/train`` + ``PATH/test`` (or ``PATH/val``) are used as the splits when both exist (with the
same class subfolders), else a fixed stratified 80/20 split (``random_state=0``) of ``PATH/<class>/*``; images are
converted to RGB and resized to 64 px by default (shorter side, then a centre crop); ImageNet statistics.
``imagefolder-unlabeled:PATH`` takes every image file under ``PATH`` (recursively, sorted by path) with label ``-1``
and holds out a fixed 10 % (at least one image; ``random_state=0``) as the held-out split that the training
monitor embeds; supervised methods refuse it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from batchmates.data.datasets.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetSource,
    DatasetSplits,
    DecodedImages,
    _not_found,
)

__all__ = ["IMAGEFOLDER", "IMAGEFOLDER_UNLABELED", "IMAGEFOLDER_TEST_FRACTION", "IMAGEFOLDER_SPLIT_SEED",
           "UNLABELED_HELD_OUT"]

#: ``imagefolder:PATH`` without ``train/`` + ``test/`` (or ``val/``) subfolders: 20 % stratified test split.
IMAGEFOLDER_TEST_FRACTION = 0.2
IMAGEFOLDER_SPLIT_SEED = 0
#: ``imagefolder-unlabeled:PATH``: the fraction of images held out (the monitor's embedding-rank check).
UNLABELED_HELD_OUT = 0.1


def load_imagefolder(
    *, argument: str, data_dir: str | os.PathLike | None, download: bool, image_size: int | None
) -> DatasetSplits:
    """The image folder ``argument`` (the ``PATH`` of ``imagefolder:PATH``; ``data_dir``/``download`` unused)."""
    path = argument
    from sklearn.model_selection import train_test_split
    from torchvision.datasets import ImageFolder

    root = Path(path).expanduser()
    if not root.is_dir():
        raise _not_found(
            f"imagefolder:{path}",
            [root],
            (
                "pass an existing folder: imagefolder:PATH with PATH/<class>/*.jpg, "
                "or PATH/train and PATH/test (or val)",
            ),
        )
    size = image_size or 64
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        base_train, base_test = ImageFolder(str(root / "train")), ImageFolder(str(test_dir))
        if base_train.classes != base_test.classes:
            raise ValueError(
                f"imagefolder:{path}: train classes {base_train.classes} differ from {test_dir.name} classes "
                f"{base_test.classes}; both folders need the same class subfolders"
            )
        classes = base_train.classes
        train_ds: Dataset = base_train
        test_ds: Dataset = base_test
    else:
        base = ImageFolder(str(root))
        targets = np.asarray(base.targets)
        idx_train, idx_test = train_test_split(
            np.arange(len(targets)),
            test_size=IMAGEFOLDER_TEST_FRACTION,
            stratify=targets,
            random_state=IMAGEFOLDER_SPLIT_SEED,
        )
        classes = base.classes
        train_ds, test_ds = Subset(base, np.sort(idx_train).tolist()), Subset(base, np.sort(idx_test).tolist())
    return DatasetSplits(
        name=f"imagefolder:{path}",
        train=DecodedImages(train_ds, size, 3),
        test=DecodedImages(test_ds, size, 3),
        num_classes=len(classes),
        in_channels=3,
        image_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        classes=tuple(classes),
        location=str(root),
    )


def describe_imagefolder(data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    return dict(
        name="imagefolder:PATH",
        present=True,
        location="any folder of class subfolders (PATH/train + PATH/test or val, else a fixed 80/20 split)",
        size="",
        how="pass --data imagefolder:PATH",
    )


IMAGEFOLDER = DatasetSource("imagefolder", load_imagefolder, describe_imagefolder, argument="PATH")


# ---------------------------------------------------------------------------------------------- unlabelled
class _ImageFiles(Dataset):
    """``(PIL image, -1)`` for every file of a list (opened lazily, in the worker)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        with Image.open(self.files[index]) as img:
            return img.copy(), -1


def load_unlabeled_folder(
    *, argument: str, data_dir: str | os.PathLike | None, download: bool, image_size: int | None
) -> DatasetSplits:
    """Every image under ``argument`` (the ``PATH`` of ``imagefolder-unlabeled:PATH``), labels ``-1``."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(argument).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS) \
        if root.is_dir() else []
    if len(files) < 2:
        raise _not_found(f"imagefolder-unlabeled:{argument}", [root],
                         ("pass a folder holding at least two images (any layout; .jpg, .png, ... searched "
                          "recursively), e.g. imagefolder-unlabeled:~/photos",))
    order = np.random.default_rng(IMAGEFOLDER_SPLIT_SEED).permutation(len(files))
    n_test = max(1, int(round(UNLABELED_HELD_OUT * len(files))))
    test = sorted(order[:n_test].tolist())
    train = sorted(order[n_test:].tolist())
    size = image_size or 64
    return DatasetSplits(
        name=f"imagefolder-unlabeled:{argument}",
        train=DecodedImages(_ImageFiles([files[i] for i in train]), size, 3),
        test=DecodedImages(_ImageFiles([files[i] for i in test]), size, 3),
        num_classes=0,
        in_channels=3,
        image_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        classes=(),
        location=str(root),
    )


def describe_unlabeled_folder(data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    return dict(
        name="imagefolder-unlabeled:PATH",
        present=True,
        location="any folder of images, no labels (self-supervised methods only; 10% held out)",
        size="",
        how="pass --data imagefolder-unlabeled:PATH",
    )


IMAGEFOLDER_UNLABELED = DatasetSource("imagefolder-unlabeled", load_unlabeled_folder, describe_unlabeled_folder,
                                      argument="PATH", labeled=False)
