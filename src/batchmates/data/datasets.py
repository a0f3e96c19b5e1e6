"""Datasets as uint8 tensors: small sets held in memory, large or variable-size sets decoded by workers.

Every loader returns a :class:`DatasetSplits`. Small sets (digits, Fashion-MNIST, CIFAR-10/100, STL-10
train/test) are :class:`InMemoryImages` — ``uint8 [N, C, H, W]`` images and ``int64 [N]`` labels — which
the training loop slices into batches and augments on the training device a whole batch at a time
(:mod:`batchmates.data.augment`). Large or variable-size sets (STL-10 unlabeled, Flowers-102,
``imagefolder:PATH``) are ordinary torch ``Dataset`` s whose items are decoded and resized in DataLoader
workers to a fixed ``uint8 [C, S, S]`` tensor, then augmented the same batched way.

Where files are looked for, in order (library choice):

1. ``data_dir`` (the ``--data-dir`` option) and a per-dataset subfolder of it,
2. ``$BATCHMATES_DATA`` and its per-dataset subfolder,
3. a system location where one exists (``/usr/share/datasets/fashion-mnist`` from Debian's
   ``dataset-fashion-mnist`` package),
4. the download cache ``$XDG_CACHE_HOME/batchmates/data`` (``~/.cache/batchmates/data``), where
   ``download=True`` puts files when no ``data_dir`` / ``$BATCHMATES_DATA`` is given.

A missing dataset raises :class:`DatasetNotFoundError` (a ``FileNotFoundError``) listing every place that
was searched and how to get the files.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset, Subset

__all__ = [
    "DatasetSplits",
    "InMemoryImages",
    "DecodedImages",
    "STL10Unlabeled",
    "DatasetNotFoundError",
    "DATASETS",
    "load_dataset",
    "describe_datasets",
    "read_idx",
    "channel_stats",
    "default_cache_dir",
    "DIGITS_TEST_FRACTION",
    "DIGITS_SPLIT_SEED",
]

#: Debian's ``dataset-fashion-mnist`` installs the IDX files here. Module-level so tests can monkeypatch it.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The fixed digits split: 25 % test, stratified by class, ``random_state=0`` -> 1347 train / 450 test.
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
#: ``imagefolder:PATH`` without ``train/`` + ``test/`` (or ``val/``) subfolders: 20 % stratified test split.
IMAGEFOLDER_TEST_FRACTION = 0.2
IMAGEFOLDER_SPLIT_SEED = 0

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "stl10", "flowers102", "imagefolder:PATH")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
_CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not in any searched location; the message lists them and how to get the files."""


# --------------------------------------------------------------------------------------------- containers
class InMemoryImages(Dataset):
    """A labelled image set held in memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``.

    Also a map-style torch ``Dataset`` (item ``i`` is ``(images[i], labels[i])``), but the fast path is
    :class:`batchmates.data.loaders.InMemoryBatchLoader`, which slices whole batches without workers.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TypeError("InMemoryImages(images, labels) takes torch tensors; convert with torch.as_tensor")
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W]; got {images.dtype} with shape {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels must be [N] with N = images.shape[0] = {images.shape[0]}; got shape {tuple(labels.shape)}"
            )
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64).contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"InMemoryImages(n={len(self)}, shape={self.shape})"


class DecodedImages(Dataset):
    """Wrap a dataset of ``(PIL image, label)`` items; decode to a fixed-size uint8 ``[C, S, S]`` tensor.

    The resize runs in DataLoader workers: shorter side to ``image_size`` (bilinear, antialiased), then a
    centre crop to ``image_size × image_size``. ``channels`` converts to ``"L"`` (1) or ``"RGB"`` (3).
    """

    def __init__(self, base: Dataset, image_size: int, channels: int = 3) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3; got {channels}")
        self.base = base
        self.image_size = int(image_size)
        self.channels = channels

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        img, label = self.base[index]
        if not isinstance(img, Image.Image):
            raise TypeError(f"DecodedImages expects PIL images from its base dataset; got {type(img).__name__}")
        img = img.convert("L" if self.channels == 1 else "RGB")
        s = self.image_size
        w, h = img.size
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - s) // 2, (nh - s) // 2
        img = img.crop((left, top, left + s, top + s))
        arr = np.asarray(img, dtype=np.uint8)
        t = torch.from_numpy(arr.copy())
        t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
        return t.contiguous(), int(label)


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


@dataclass
class DatasetSplits:
    """A dataset ready for training: splits plus what models and augmentations need to know.

    ``mean``/``std`` are per-channel statistics of images scaled to [0, 1] (normalise with
    ``(x / 255 - mean) / std``). ``hflip`` says whether a horizontal flip preserves labels (False for digits).
    ``unlabeled`` is set for STL-10 only.
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    unlabeled: Dataset | None = None
    hflip: bool = True
    location: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def in_memory(self) -> bool:
        """True when train and test are :class:`InMemoryImages`."""
        return isinstance(self.train, InMemoryImages) and isinstance(self.test, InMemoryImages)


# --------------------------------------------------------------------------------------------- helpers
def default_cache_dir() -> Path:
    """Where ``download=True`` stores data when neither ``data_dir`` nor ``$BATCHMATES_DATA`` is set."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchmates" / "data"


def _roots(data_dir: str | os.PathLike | None) -> list[Path]:
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    env = os.environ.get("BATCHMATES_DATA")
    if env:
        roots.append(Path(env).expanduser())
    roots.append(default_cache_dir())
    return roots


def _download_root(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("BATCHMATES_DATA")
    return Path(env).expanduser() if env else default_cache_dir()


def _not_found(name: str, looked: Sequence[Path | str], how: Sequence[str]) -> DatasetNotFoundError:
    places = "\n".join(f"  - {p}" for p in looked)
    hows = "\n".join(f"  - {h}" for h in how)
    return DatasetNotFoundError(f"dataset {name!r} not found. Looked in:\n{places}\nTo get it:\n{hows}")


def _resize_uint8(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Resize uint8 ``[N, C, H, W]`` to ``size × size`` (bilinear, antialiased when shrinking)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].float()
        shrink = size < min(images.shape[-2:])
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        out.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 ``[N, C, H, W]`` images scaled to [0, 1], in float64."""
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64).div_(255.0)
        s += x.sum(dim=(0, 2, 3))
        s2 += x.square().sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s / n
    std = (s2 / n - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def _finish_in_memory(
    name: str,
    train: InMemoryImages,
    test: InMemoryImages,
    classes: Sequence[str],
    image_size: int | None,
    *,
    hflip: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    location: str = "",
) -> DatasetSplits:
    native = train.images.shape[-1]
    if image_size is not None and image_size != native:
        train = InMemoryImages(_resize_uint8(train.images, image_size), train.labels)
        test = InMemoryImages(_resize_uint8(test.images, image_size), test.labels)
    if mean is None or std is None:
        mean, std = channel_stats(train.images)
    return DatasetSplits(
        name=name,
        train=train,
        test=test,
        num_classes=len(classes),
        in_channels=int(train.images.shape[1]),
        image_size=int(train.images.shape[-1]),
        mean=tuple(mean),
        std=tuple(std),
        classes=tuple(classes),
        hflip=hflip,
        location=location,
    )


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None (native size); got {image_size!r}")


# --------------------------------------------------------------------------------------------- digits
def _load_digits(image_size: int | None) -> DatasetSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = torch.from_numpy(np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=d.target, random_state=DIGITS_SPLIT_SEED
    )
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    train = InMemoryImages(images[idx_train], labels[idx_train])
    test = InMemoryImages(images[idx_test], labels[idx_test])
    return _finish_in_memory(
        "digits", train, test, [str(i) for i in range(10)], image_size, hflip=False, location="scikit-learn"
    )


# --------------------------------------------------------------------------------------------- IDX
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _idx_header(f, path: Path) -> tuple[Any, tuple[int, ...]]:
    head = f.read(4)
    if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
        raise ValueError(
            f"{path} is not an IDX file (magic bytes {head.hex() or 'missing'}; expected 00 00 <type> <ndim>, "
            "e.g. 00000803 for images, 00000801 for labels). Re-download it."
        )
    ndim = head[3]
    raw = f.read(4 * ndim)
    if len(raw) != 4 * ndim:
        raise ValueError(f"{path}: IDX header truncated (expected {ndim} dimension sizes). Re-download it.")
    return _IDX_DTYPES[head[2]], struct.unpack(f">{ndim}I", raw)


def read_idx(path: str | os.PathLike, *, expect_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed; detected from its bytes) into a numpy array.

    Validates the magic number, the dimension count (``expect_ndim``) and that the payload has exactly
    ``prod(shape)`` elements.
    """
    path = Path(path)
    with _open_maybe_gzip(path) as f:
        dtype, shape = _idx_header(f, path)
        if expect_ndim is not None and len(shape) != expect_ndim:
            raise ValueError(f"{path}: IDX file has {len(shape)} dimensions {shape}; expected {expect_ndim}")
        data = f.read()
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) * dt.itemsize
    if len(data) != n:
        raise ValueError(
            f"{path}: IDX payload has {len(data)} bytes but header shape {shape} needs {n}; the file is "
            "truncated or corrupt. Re-download it."
        )
    return np.frombuffer(data, dtype=dt).reshape(shape)


def _idx_count(path: Path) -> int:
    with _open_maybe_gzip(path) as f:
        return _idx_header(f, path)[1][0]


def _fashion_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    dirs: list[Path] = []
    roots = _roots(data_dir)
    for root in roots[:-1]:  # data_dir and $BATCHMATES_DATA
        dirs += [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]
    dirs.append(FASHION_MNIST_SYSTEM_DIR)
    cache = roots[-1]
    dirs += [cache / "fashion-mnist", cache / "FashionMNIST" / "raw"]
    return dirs


def _find_idx_set(directory: Path) -> dict[str, Path] | None:
    found: dict[str, Path] = {}
    for key, stem in _FASHION_FILES.items():
        for cand in (directory / stem, directory / f"{stem}.gz"):
            if cand.is_file():
                found[key] = cand
                break
        else:
            return None
    return found


_FASHION_HOW = (
    "Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist (installs /usr/share/datasets/fashion-mnist)",
    "or download it: pass --download (download=True), optionally with --data-dir DIR (or set $BATCHMATES_DATA)",
    "or put train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz) and "
    "t10k-labels-idx1-ubyte(.gz) in a folder and pass --data-dir DIR",
)


def _locate_fashion(data_dir: str | os.PathLike | None) -> tuple[dict[str, Path] | None, list[Path]]:
    dirs = _fashion_dirs(data_dir)
    for d in dirs:
        if d.is_dir() and (files := _find_idx_set(d)) is not None:
            return files, dirs
    return None, dirs


def _load_fashion(data_dir: str | os.PathLike | None, download: bool, image_size: int | None) -> DatasetSplits:
    files, looked = _locate_fashion(data_dir)
    if files is None and download:
        import torchvision

        root = _download_root(data_dir)
        for train in (True, False):
            torchvision.datasets.FashionMNIST(str(root), train=train, download=True)
        files = _find_idx_set(root / "FashionMNIST" / "raw")
    if files is None:
        raise _not_found("fashion-mnist", looked, _FASHION_HOW)
    arrays = {k: read_idx(p, expect_ndim=3 if k.endswith("images") else 1) for k, p in files.items()}
    for split in ("train", "test"):
        ni, nl = arrays[f"{split}_images"].shape[0], arrays[f"{split}_labels"].shape[0]
        if ni != nl:
            raise ValueError(f"fashion-mnist {split}: {ni} images but {nl} labels in {files[f'{split}_images'].parent}")
    train = InMemoryImages(
        torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
    )
    test = InMemoryImages(
        torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )
    return _finish_in_memory(
        "fashion-mnist", train, test, FASHION_MNIST_CLASSES, image_size, location=str(files["train_images"].parent)
    )


# --------------------------------------------------------------------------------------------- torchvision sets
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


def _load_cifar(name: str, data_dir, download: bool, image_size: int | None) -> DatasetSplits:
    root = _tv_root(name, data_dir, download)
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    splits = []
    for train in (True, False):
        ds = cls(str(root), train=train, download=download)
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        splits.append(InMemoryImages(images, torch.as_tensor(ds.targets, dtype=torch.int64)))
    mean, std = (_CIFAR10_MEAN, _CIFAR10_STD) if name == "cifar10" else (_CIFAR100_MEAN, _CIFAR100_STD)
    return _finish_in_memory(
        name, splits[0], splits[1], ds.classes, image_size, mean=mean, std=std, location=str(root / _TV_LAYOUT[name])
    )


def _load_stl10(data_dir, download: bool, image_size: int | None) -> DatasetSplits:
    root = _tv_root("stl10", data_dir, download)
    import torchvision

    splits = []
    for split in ("train", "test"):
        ds = torchvision.datasets.STL10(str(root), split=split, download=download)
        splits.append(InMemoryImages(torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64))))
    out = _finish_in_memory(
        "stl10",
        splits[0],
        splits[1],
        ds.classes,
        image_size,
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        location=str(root / "stl10_binary"),
    )
    unl = root / "stl10_binary" / "unlabeled_X.bin"
    out.unlabeled = STL10Unlabeled(unl, out.image_size) if unl.is_file() else None
    return out


def _load_flowers(data_dir, download: bool, image_size: int | None) -> DatasetSplits:
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
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        classes=tuple(str(i) for i in range(102)),
        location=str(root / "flowers-102"),
    )


def _load_imagefolder(path: str, image_size: int | None) -> DatasetSplits:
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
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        classes=tuple(classes),
        location=str(root),
    )


# --------------------------------------------------------------------------------------------- public entry points
def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
) -> DatasetSplits:
    """Load a dataset by name: one of :data:`DATASETS` (``imagefolder:PATH`` with a real path).

    ``image_size`` resizes (None keeps the native size: digits 8, Fashion-MNIST 28, CIFAR 32, STL-10 96;
    Flowers-102 defaults to 96 and image folders to 64). ``download=True`` lets torchvision fetch missing
    files into ``data_dir`` / ``$BATCHMATES_DATA`` / :func:`default_cache_dir`.
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str; got {type(name).__name__}")
    _check_image_size(image_size)
    key = name.strip().lower()
    if key == "digits":
        return _load_digits(image_size)
    if key in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return _load_fashion(data_dir, download, image_size)
    if key in ("cifar10", "cifar100"):
        return _load_cifar(key, data_dir, download, image_size)
    if key == "stl10":
        return _load_stl10(data_dir, download, image_size)
    if key in ("flowers102", "flowers-102"):
        return _load_flowers(data_dir, download, image_size)
    if name.startswith("imagefolder:") and len(name) > len("imagefolder:"):
        return _load_imagefolder(name[len("imagefolder:") :], image_size)
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe_datasets(data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One dict per dataset for ``batchmates data list``: ``name``, ``present``, ``location``, ``size``, ``how``.

    Fast: nothing is decoded (Fashion-MNIST counts come from IDX headers, STL-10 counts from file sizes,
    other folders report bytes on disk). For a missing dataset ``location`` lists where it looked.
    """
    rows: list[dict[str, Any]] = []
    n_digits = 1797
    n_test = int(np.ceil(n_digits * DIGITS_TEST_FRACTION))
    rows.append(
        dict(
            name="digits",
            present=True,
            location="bundled with scikit-learn",
            size=f"{n_digits - n_test} train / {n_test} test images (8x8, 1 channel)",
            how="always available (scikit-learn)",
        )
    )
    files, looked = _locate_fashion(data_dir)
    if files is not None:
        n_tr, n_te = _idx_count(files["train_images"]), _idx_count(files["test_images"])
        rows.append(
            dict(
                name="fashion-mnist",
                present=True,
                location=str(files["train_images"].parent),
                size=f"{n_tr} train / {n_te} test images (28x28, 1 channel)",
                how="",
            )
        )
    else:
        rows.append(
            dict(
                name="fashion-mnist",
                present=False,
                location="looked in: " + ", ".join(str(p) for p in looked),
                size="",
                how="; ".join(_FASHION_HOW[:2]),
            )
        )
    for name in ("cifar10", "cifar100", "stl10", "flowers102"):
        root, looked_tv = _locate_tv(name, data_dir)
        how = f"--download (optionally --data-dir DIR), or place {_TV_HOW[name]} as {_TV_LAYOUT[name]}/"
        if root is None:
            rows.append(
                dict(
                    name=name,
                    present=False,
                    location="looked in: " + ", ".join(str(p) for p in looked_tv),
                    size="",
                    how=how,
                )
            )
            continue
        folder = root / _TV_LAYOUT[name]
        if name == "stl10":
            counts = {}
            for split in ("train", "test", "unlabeled"):
                f = folder / f"{split}_X.bin"
                counts[split] = f.stat().st_size // STL10Unlabeled._BYTES if f.is_file() else 0
            size = f"{counts['train']} train / {counts['test']} test / {counts['unlabeled']} unlabeled images (96x96)"
        else:
            size = _human_bytes(_dir_bytes(folder)) + " on disk"
        rows.append(dict(name=name, present=True, location=str(folder), size=size, how=""))
    rows.append(
        dict(
            name="imagefolder:PATH",
            present=True,
            location="any folder of class subfolders (PATH/train + PATH/test or val, else a fixed 80/20 split)",
            size="",
            how="pass --data imagefolder:PATH",
        )
    )
    return rows
