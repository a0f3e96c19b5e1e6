"""The sets torchvision downloads and reads: CIFAR-10/100, STL-10 (with its unlabeled split) and Flowers-102.

Paper facts carried over: CIFAR-10/100 (Krizhevsky 2009) 50 000 train / 10 000 test 32x32 images; STL-10 (Coates
et al. 2011) 5 000 train / 8 000 test / 100 000 unlabeled 96x96 images; Oxford Flowers-102 (Nilsback & Zisserman
2008) with official train / val / test splits.
Library choices: the files are found in torchvision's folder layout (``cifar-10-batches-py/`` ...) under
``data_dir`` or ``$BATCHMATES_DATA`` (or their ``<name>/`` subfolder) or the download cache; CIFAR and STL-10
train/test are held in memory, STL-10 unlabeled is memory-mapped and Flowers-102 decoded in workers
(train = official train + val, 96 px by default); CIFAR uses its usual per-set statistics, STL-10 and
Flowers-102 ImageNet's.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from batchmates.data.datasets.checks import READ_ERRORS, corrupt_file
from batchmates.data.datasets.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetNotFoundError,
    DatasetSource,
    DatasetSplits,
    DecodedImages,
    InMemoryImages,
    _dir_bytes,
    _download_root,
    _finish_in_memory,
    _human_bytes,
    _missing_row,
    _not_found,
    _resize_uint8,
    _roots,
)

__all__ = ["CIFAR10", "CIFAR100", "STL10", "FLOWERS102", "STL10Unlabeled"]

_CIFAR_STATS = {  # name -> (mean, std) of the training images in [0, 1]
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class STL10Unlabeled(Dataset):
    """STL-10's 100 000 unlabeled 96×96 images read lazily from ``unlabeled_X.bin`` (memory-mapped).

    Items are ``(uint8 [3, S, S], -1)``; ``image_size != 96`` resizes in the worker. The binary stores each
    image channel-major and column-major (the STL-10 format), hence the transpose.
    """

    _BYTES = 3 * 96 * 96

    def __init__(self, path: str | os.PathLike, image_size: int = 96) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        if size % self._BYTES:
            raise ValueError(f"{self.path} has {size} bytes, not a multiple of one 3x96x96 image; is it truncated?")
        self.n = size // self._BYTES
        self.image_size = int(image_size)
        self._data: np.memmap | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._data is None:  # opened lazily, once per worker process
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.n, 3, 96, 96))
        img = torch.from_numpy(np.array(self._data[index])).transpose(1, 2).contiguous()
        if self.image_size != 96:
            img = _resize_uint8(img.unsqueeze(0), self.image_size)[0]
        return img, -1

    def __getstate__(self) -> dict[str, Any]:  # never pickle the memmap into workers
        state = dict(self.__dict__)
        state["_data"] = None
        return state


_TV_LAYOUT = {  # name -> (folder torchvision expects under its root, subfolder names we also accept as roots)
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "stl10": "stl10_binary",
    "flowers102": "flowers-102",
}
_TV_HOW = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extracted",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, extracted",
    "stl10": "https://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz, extracted",
    "flowers102": "the Oxford Flowers-102 files (102flowers.tgz extracted to jpg/, imagelabels.mat, setid.mat)",
}


def _tv_candidates(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    out: list[Path] = []
    for root in _roots(data_dir):
        out += [root, root / name]
    return out


def _locate_tv(name: str, data_dir: str | os.PathLike | None) -> tuple[Path | None, list[Path]]:
    roots = _tv_candidates(name, data_dir)
    folder = _TV_LAYOUT[name]
    for r in roots:
        if (r / folder).is_dir():
            return r, [r / folder for r in roots]
    return None, [r / folder for r in roots]


def _tv_root(name: str, data_dir: str | os.PathLike | None, download: bool) -> Path:
    root, looked = _locate_tv(name, data_dir)
    if root is not None:
        return root
    if download:
        return _download_root(data_dir)
    raise _not_found(
        name,
        looked,
        (
            "download it: pass --download (download=True), optionally with --data-dir DIR (or set $BATCHMATES_DATA)",
            f"or place {_TV_HOW[name]} as {_TV_LAYOUT[name]}/ under --data-dir DIR or $BATCHMATES_DATA",
        ),
    )


@contextlib.contextmanager
def _reading(folder: Path, download: bool) -> Iterator[None]:
    """torchvision's errors reading damaged files (pickle, EOF, size mismatch) as a ``DatasetCorruptError``."""
    try:
        yield
    except DatasetNotFoundError:
        raise
    except (*READ_ERRORS, pickle.UnpicklingError, KeyError, RuntimeError) as e:
        if download and isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            raise  # a network error while downloading: torchvision's message says what failed
        raise corrupt_file(folder, f"cannot be read by torchvision ({type(e).__name__}: {e})") from None


def _load_cifar(name: str, *, data_dir, download: bool, image_size: int | None) -> DatasetSplits:
    root = _tv_root(name, data_dir, download)
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    splits = []
    for train in (True, False):
        with _reading(root / _TV_LAYOUT[name], download):
            ds = cls(str(root), train=train, download=download)
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        splits.append(InMemoryImages(images, torch.as_tensor(ds.targets, dtype=torch.int64)))
    mean, std = _CIFAR_STATS[name]
    return _finish_in_memory(
        name, splits[0], splits[1], ds.classes, image_size, mean=mean, std=std, location=str(root / _TV_LAYOUT[name])
    )


def _load_stl10(*, data_dir, download: bool, image_size: int | None) -> DatasetSplits:
    root = _tv_root("stl10", data_dir, download)
    import torchvision

    splits = []
    for split in ("train", "test"):
        with _reading(root / "stl10_binary", download):
            ds = torchvision.datasets.STL10(str(root), split=split, download=download)
        splits.append(InMemoryImages(torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64))))
    out = _finish_in_memory(
        "stl10",
        splits[0],
        splits[1],
        ds.classes,
        image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        location=str(root / "stl10_binary"),
    )
    unl = root / "stl10_binary" / "unlabeled_X.bin"
    out.unlabeled = STL10Unlabeled(unl, out.image_size) if unl.is_file() else None
    return out


def _load_flowers(*, data_dir, download: bool, image_size: int | None) -> DatasetSplits:
    root = _tv_root("flowers102", data_dir, download)
    import torchvision

    size = image_size or 96
    parts = {
        s: torchvision.datasets.Flowers102(str(root), split=s, download=download) for s in ("train", "val", "test")
    }
    # Library choice: train = the official train + val splits (2040 images), test = the official test split.
    train = DecodedImages(ConcatDataset([parts["train"], parts["val"]]), size, 3)
    test = DecodedImages(parts["test"], size, 3)
    return DatasetSplits(
        name="flowers102",
        train=train,
        test=test,
        num_classes=102,
        in_channels=3,
        image_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        classes=tuple(str(i) for i in range(102)),
        location=str(root / "flowers-102"),
    )


def _describe_tv(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    root, looked = _locate_tv(name, data_dir)
    if root is None:
        how = f"--download (optionally --data-dir DIR), or place {_TV_HOW[name]} as {_TV_LAYOUT[name]}/"
        return _missing_row(name, looked, how)
    folder = root / _TV_LAYOUT[name]
    if name == "stl10":
        counts = {}
        for split in ("train", "test", "unlabeled"):
            f = folder / f"{split}_X.bin"
            counts[split] = f.stat().st_size // STL10Unlabeled._BYTES if f.is_file() else 0
        size = f"{counts['train']} train / {counts['test']} test / {counts['unlabeled']} unlabeled images (96x96)"
    else:
        size = _human_bytes(_dir_bytes(folder)) + " on disk"
    return dict(name=name, present=True, location=str(folder), size=size, how="")


CIFAR10 = DatasetSource(
    "cifar10", functools.partial(_load_cifar, "cifar10"), functools.partial(_describe_tv, "cifar10")
)
CIFAR100 = DatasetSource(
    "cifar100", functools.partial(_load_cifar, "cifar100"), functools.partial(_describe_tv, "cifar100")
)
STL10 = DatasetSource("stl10", _load_stl10, functools.partial(_describe_tv, "stl10"))
FLOWERS102 = DatasetSource(
    "flowers102", _load_flowers, functools.partial(_describe_tv, "flowers102"), aliases=("flowers-102",)
)
