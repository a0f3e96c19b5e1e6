"""Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747) read from its IDX files, and the IDX reader itself.

Paper: 70 000 grey 28x28 images of 10 clothing classes, 60 000 train / 10 000 test, shipped as four IDX files.
Library choices: files are looked for in ``data_dir`` (and its ``fashion-mnist/`` and torchvision's
``FashionMNIST/raw/`` subfolders) only when it is given (a ``data_dir`` without all four files is an error that
lists the missing ones, never a silent fall-back to another copy), else in ``$BATCHMATES_DATA``, Debian's
``dataset-fashion-mnist`` location (:data:`FASHION_MNIST_SYSTEM_DIR`) and the download cache; plain or
gzip-compressed files (detected from their bytes); a damaged file (truncated or bit-flipped ``.gz``, bad IDX header,
wrong payload size, 28x28 images expected, as many labels as images) is a
:class:`~batchmates.data.datasets.checks.DatasetCorruptError` naming it; ``download=True`` fetches missing files
with torchvision; mean and std are the training split's. The supervised random crop pads by
:data:`CROP_PADDING` = 1 px at 28 px (scaled with ``image_size``), not the augmentation's default 4 (library choice,
measured with ``scripts/fmnist_recipe.py``: resnet-small, bf16, batch 128, 15 epochs of cosine schedule, test top-1
after the last epoch, seeds 0-2: 93.72 / 93.72 / 93.65% with 1 px against 93.15 / 93.14 / 93.23% with 2 px; 91.80%
with 4 px, seed 0, after 14 of its 15 epochs; issue 10, ``docs/benchmarks.md``). ``--crop-padding`` overrides it.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchmates.data.datasets.checks import READ_ERRORS, DatasetCorruptError, corrupt_file
from batchmates.data.datasets.common import (
    DatasetSource,
    DatasetSplits,
    InMemoryImages,
    _download_root,
    _finish_in_memory,
    _missing_row,
    _not_found,
    _roots,
)

__all__ = ["FASHION_MNIST", "FASHION_MNIST_CLASSES", "FASHION_MNIST_SYSTEM_DIR", "CROP_PADDING", "read_idx"]

#: Zero padding of the supervised random crop at 28 px (library choice, measured: see the module docstring).
CROP_PADDING = 1

#: Debian's ``dataset-fashion-mnist`` installs the IDX files here. Module-level so tests can monkeypatch it.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _idx_header(f, path: Path) -> tuple[Any, tuple[int, ...]]:
    head = f.read(4)
    if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
        raise corrupt_file(path, f"not an IDX file (magic bytes {head.hex() or 'missing'}; expected 00 00 <type> "
                           "<ndim>, e.g. 00000803 for images, 00000801 for labels)")
    ndim = head[3]
    raw = f.read(4 * ndim)
    if len(raw) != 4 * ndim:
        raise corrupt_file(path, f"IDX header truncated (expected {ndim} dimension sizes)")
    return _IDX_DTYPES[head[2]], struct.unpack(f">{ndim}I", raw)


def read_idx(path: str | os.PathLike, *, expect_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed; detected from its bytes) into a numpy array.

    Validates the magic number, the dimension count (``expect_ndim``) and that the payload has exactly
    ``prod(shape)`` elements.
    """
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as f:
            dtype, shape = _idx_header(f, path)
            if expect_ndim is not None and len(shape) != expect_ndim:
                raise corrupt_file(path, f"IDX file has {len(shape)} dimensions {shape}; expected {expect_ndim}")
            data = f.read()
    except DatasetCorruptError:
        raise
    except READ_ERRORS as e:  # gzip: CRC or length mismatch, truncated stream, bad header
        raise corrupt_file(path, f"cannot be read ({type(e).__name__}: {e})") from None
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) * dt.itemsize
    if len(data) != n:
        raise corrupt_file(path, f"IDX payload has {len(data)} bytes but header shape {shape} needs {n}")
    return np.frombuffer(data, dtype=dt).reshape(shape)


def _idx_count(path: Path) -> int:
    try:
        with _open_maybe_gzip(path) as f:
            return _idx_header(f, path)[1][0]
    except DatasetCorruptError:
        raise
    except READ_ERRORS as e:
        raise corrupt_file(path, f"cannot be read ({type(e).__name__}: {e})") from None


def _fashion_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is not None:  # given: only there (a partial copy is an error, not a reason to look elsewhere)
        root = Path(data_dir).expanduser()
        return [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]
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


def load_fashion_mnist(*, data_dir: str | os.PathLike | None, download: bool, image_size: int | None) -> DatasetSplits:
    """Fashion-MNIST from the first folder that holds all four IDX files (downloaded if allowed and missing)."""
    files, looked = _locate_fashion(data_dir)
    if files is None and download:
        import torchvision

        root = _download_root(data_dir)
        for train in (True, False):
            torchvision.datasets.FashionMNIST(str(root), train=train, download=True)
        files = _find_idx_set(root / "FashionMNIST" / "raw")
    if files is None:
        _raise_if_partial(data_dir, looked)
        raise _not_found("fashion-mnist", looked, _FASHION_HOW)
    arrays = {k: read_idx(p, expect_ndim=3 if k.endswith("images") else 1) for k, p in files.items()}
    for split in ("train", "test"):
        ni, nl = arrays[f"{split}_images"].shape[0], arrays[f"{split}_labels"].shape[0]
        if ni != nl:
            raise corrupt_file(files[f"{split}_labels"], f"fashion-mnist {split}: {ni} images but {nl} labels "
                               f"({files[f'{split}_images'].name}); each image needs one label")
        if arrays[f"{split}_images"].shape[1:] != (28, 28):
            raise corrupt_file(files[f"{split}_images"], f"images of {arrays[f'{split}_images'].shape[1:]} pixels; "
                               "Fashion-MNIST images are 28x28")
    train = InMemoryImages(
        torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
    )
    test = InMemoryImages(
        torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )
    return _finish_in_memory(
        "fashion-mnist", train, test, FASHION_MNIST_CLASSES, image_size, location=str(files["train_images"].parent),
        crop_padding=CROP_PADDING,
    )


def _raise_if_partial(data_dir: str | os.PathLike | None, looked: list[Path]) -> None:
    """A ``data_dir`` holding some of the four files but not all: say which ones are missing."""
    if data_dir is None:
        return
    for d in looked:
        have = [stem for stem in _FASHION_FILES.values() if (d / stem).is_file() or (d / f"{stem}.gz").is_file()]
        if have:
            missing = [stem for stem in _FASHION_FILES.values() if stem not in have]
            raise _not_found(f"fashion-mnist (incomplete in {d}: missing {', '.join(missing)})", looked,
                             _FASHION_HOW[1:])


def describe_fashion_mnist(data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    files, looked = _locate_fashion(data_dir)
    if files is None:
        return _missing_row("fashion-mnist", looked, "; ".join(_FASHION_HOW[:2]))
    n_tr, n_te = _idx_count(files["train_images"]), _idx_count(files["test_images"])
    return dict(
        name="fashion-mnist",
        present=True,
        location=str(files["train_images"].parent),
        size=f"{n_tr} train / {n_te} test images (28x28, 1 channel)",
        how="",
    )


FASHION_MNIST = DatasetSource(
    "fashion-mnist", load_fashion_mnist, describe_fashion_mnist, aliases=("fashion_mnist", "fashionmnist")
)
