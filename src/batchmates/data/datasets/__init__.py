"""Datasets as uint8 tensors: small sets held in memory, large or variable-size sets decoded by workers.

Every loader returns a :class:`DatasetSplits`. Small sets (digits, Fashion-MNIST, CIFAR-10/100, STL-10
train/test) are :class:`InMemoryImages` — ``uint8 [N, C, H, W]`` images and ``int64 [N]`` labels — which
the training loop slices into batches and augments on the training device a whole batch at a time
(:mod:`batchmates.data.augment`). Large or variable-size sets (STL-10 unlabeled, Flowers-102,
``imagefolder:PATH``) are ordinary torch ``Dataset`` s whose items are decoded and resized in DataLoader
workers to a fixed ``uint8 [C, S, S]`` tensor, then augmented the same batched way.

Library choices:

* One file per family (:mod:`.digits`, :mod:`.fashion_mnist`, :mod:`.torchvision_sets`, :mod:`.imagefolder`
  (with and without labels), :mod:`.custom` (a user's own ``Dataset``); shared containers and helpers in
  :mod:`.common`), each defining :class:`DatasetSource` objects that this
  package registers by name in :data:`DATASET_SOURCES` (the package imports its members, never the other way
  round). Adding a dataset is one file plus one entry in ``_BUILTIN`` below (or :func:`register_dataset` from
  user code).
* Where files are looked for, in order: ``data_dir`` (the ``--data-dir`` option) and a per-dataset subfolder of
  it; ``$BATCHMATES_DATA`` and its per-dataset subfolder; a system location where one exists
  (``/usr/share/datasets/fashion-mnist`` from Debian's ``dataset-fashion-mnist`` package); the download cache
  ``$XDG_CACHE_HOME/batchmates/data`` (``~/.cache/batchmates/data``), where ``download=True`` puts files when no
  ``data_dir`` / ``$BATCHMATES_DATA`` is given.
* A missing dataset raises :class:`DatasetNotFoundError` (a ``FileNotFoundError``) listing every place that
  was searched and how to get the files.
"""

from __future__ import annotations

import os
from typing import Any

from batchmates.data.datasets.checks import DatasetCorruptError, validate_splits
from batchmates.data.datasets.common import (
    DatasetNotFoundError,
    DatasetSource,
    DatasetSplits,
    DecodedImages,
    InMemoryImages,
    _check_image_size,
    channel_stats,
    default_cache_dir,
)
from batchmates.data.datasets.custom import CUSTOM, splits_from_datasets
from batchmates.data.datasets.digits import DIGITS, DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION
from batchmates.data.datasets.fashion_mnist import (
    FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_SYSTEM_DIR,
    read_idx,
)
from batchmates.data.datasets.imagefolder import (
    IMAGEFOLDER,
    IMAGEFOLDER_SPLIT_SEED,
    IMAGEFOLDER_TEST_FRACTION,
    IMAGEFOLDER_UNLABELED,
)
from batchmates.data.datasets.torchvision_sets import CIFAR10, CIFAR100, FLOWERS102, STL10, STL10Unlabeled
from batchmates.registry import Registry

__all__ = [
    "DatasetSplits",
    "InMemoryImages",
    "DecodedImages",
    "STL10Unlabeled",
    "DatasetNotFoundError",
    "DatasetCorruptError",
    "DatasetSource",
    "DATASETS",
    "DATASET_SOURCES",
    "available_datasets",
    "register_dataset",
    "resolve_dataset",
    "load_dataset",
    "describe_datasets",
    "splits_from_datasets",
    "read_idx",
    "channel_stats",
    "default_cache_dir",
    "DIGITS_TEST_FRACTION",
    "DIGITS_SPLIT_SEED",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_SYSTEM_DIR",
    "IMAGEFOLDER_TEST_FRACTION",
    "IMAGEFOLDER_SPLIT_SEED",
]

#: Every dataset by ``--data`` name (aliases included, each pointing at its :class:`DatasetSource`).
DATASET_SOURCES: Registry[DatasetSource] = Registry("dataset", flag="--data")


def register_dataset(source: DatasetSource) -> DatasetSource:
    """Make ``source`` loadable by :func:`load_dataset` under its name and aliases; returns it."""
    if not isinstance(source, DatasetSource):
        raise TypeError(f"register_dataset takes a DatasetSource, got {type(source).__name__}")
    for name in (source.name, *source.aliases):
        if name != name.lower() or ":" in name:
            raise ValueError(f"dataset name {name!r} must be lower case without ':' (an argument follows the ':')")
        DATASET_SOURCES.register(name, source)
    return source


_BUILTIN = (DIGITS, FASHION_MNIST, CIFAR10, CIFAR100, STL10, FLOWERS102, IMAGEFOLDER, IMAGEFOLDER_UNLABELED, CUSTOM)
for _source in _BUILTIN:
    register_dataset(_source)


def available_datasets() -> list[str]:
    """The registered datasets as ``--data`` spells them (``imagefolder:PATH`` for one that takes a path)."""
    seen: list[str] = []
    for name, source in DATASET_SOURCES.items():
        if name == source.name:
            seen.append(source.display_name)
    return seen


#: The built-in datasets (a snapshot; :func:`available_datasets` also lists datasets registered later).
DATASETS: tuple[str, ...] = tuple(available_datasets())


def resolve_dataset(name: str) -> tuple[DatasetSource, str | None]:
    """The :class:`DatasetSource` of a ``--data`` value and its argument (``imagefolder:PATH`` -> ``PATH``).

    Checks the name only (nothing is read), so a configuration can be validated before a run starts.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: an unknown name (the message lists the choices), or a missing or unexpected argument.
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str; got {type(name).__name__}")
    base, sep, argument = name.strip().partition(":")
    try:
        source = DATASET_SOURCES.get(base.strip().lower())
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {available_datasets()}") from None
    if source.argument and not argument:
        raise ValueError(f"--data {name!r}: {source.name} needs {source.display_name}, e.g. {source.name}:~/images")
    if not source.argument and sep:
        raise ValueError(f"--data {name!r}: {source.name} takes no ':{argument}'; pass --data {source.name}")
    return source, (argument if source.argument else None)


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
) -> DatasetSplits:
    """Load a dataset by name: one of :func:`available_datasets` (``imagefolder:PATH`` with a real path).

    ``image_size`` resizes (None keeps the native size: digits 8, Fashion-MNIST 28, CIFAR 32, STL-10 96;
    Flowers-102 defaults to 96 and image folders to 64). ``download=True`` lets torchvision fetch missing
    files into ``data_dir`` / ``$BATCHMATES_DATA`` / :func:`default_cache_dir`.
    """
    source, argument = resolve_dataset(name)
    _check_image_size(image_size)
    kw: dict[str, Any] = {"data_dir": data_dir, "download": download, "image_size": image_size}
    if source.argument:
        kw["argument"] = argument
    return validate_splits(source.load(**kw))  # labels in range, shapes, non-empty splits (checks.py)


def describe_datasets(data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One dict per dataset for ``batchmates data list``: ``name``, ``present``, ``location``, ``size``, ``how``.

    Fast: nothing is decoded (Fashion-MNIST counts come from IDX headers, STL-10 counts from file sizes,
    other folders report bytes on disk). For a missing dataset ``location`` lists where it looked.
    """
    return [source.describe(data_dir) for name, source in DATASET_SOURCES.items() if name == source.name]
