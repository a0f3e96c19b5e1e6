"""Checks of loaded data: damaged files and inconsistent splits are errors that name the file and the fix.

Library choices (no paper involved):

* :func:`validate_splits` runs on every :func:`~batchmates.data.datasets.load_dataset` result, before anything
  trains: both splits non-empty; for in-memory splits, ``uint8 [N, C, H, W]`` images with the declared channels
  and size, and labels inside ``[0, num_classes)`` (``-1`` everywhere for an unlabelled set, ``num_classes == 0``).
  A bad label used to load fine and crash minutes into training (or silently index the wrong class).
* :class:`DatasetCorruptError` (a ``ValueError``) is a file that is there but cannot be used: a truncated or
  bit-flipped ``.gz`` (gzip's CRC-32 and length checks), a bad IDX header, a payload of the wrong size, counts
  that do not match between images and labels. :func:`corrupt_file` builds it from the low-level error, which by
  itself (``zlib.error``, ``EOFError``, ``BadGzipFile``) names no file.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["DatasetCorruptError", "corrupt_file", "validate_splits", "READ_ERRORS"]

#: Errors reading a damaged (possibly gzip-compressed) file raises.
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError)
try:
    import zlib

    READ_ERRORS = (*READ_ERRORS, zlib.error)
except ImportError:  # pragma: no cover
    pass


class DatasetCorruptError(ValueError):
    """A dataset file exists but is damaged or inconsistent; the message names it and how to get a good copy."""


def corrupt_file(path: str | os.PathLike, problem: str, *, how: str = "") -> DatasetCorruptError:
    """The error for a damaged ``path``: what is wrong and how to replace it."""
    fix = how or "delete it and download the dataset again (--download), or copy a good version over it"
    return DatasetCorruptError(f"{os.fspath(path)}: {problem}. The file is truncated or damaged: {fix}.")


def validate_splits(splits: Any) -> Any:
    """Check a loaded ``DatasetSplits`` (see the module docstring); returns it, or raises ``DatasetCorruptError``."""
    name = getattr(splits, "name", "?")
    where = f" (files in {splits.location})" if getattr(splits, "location", "") else ""
    n_classes = int(splits.num_classes)
    for split in ("train", "test"):
        ds = getattr(splits, split)
        try:
            n = len(ds)
        except TypeError:
            continue
        if n == 0:
            raise DatasetCorruptError(f"dataset {name!r}: the {split} split is empty{where}; check the files")
        images, labels = getattr(ds, "images", None), getattr(ds, "labels", None)
        if not (torch.is_tensor(images) and torch.is_tensor(labels)):
            continue  # decoded on the fly: checked item by item when read
        want = (int(splits.in_channels), int(splits.image_size), int(splits.image_size))
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise DatasetCorruptError(f"dataset {name!r}: {split} images are {images.dtype} {tuple(images.shape)}; "
                                      f"expected uint8 [N, {want[0]}, {want[1]}, {want[2]}]{where}")
        if labels.shape != (images.shape[0],):
            raise DatasetCorruptError(f"dataset {name!r}: {images.shape[0]} {split} images but labels of shape "
                                      f"{tuple(labels.shape)}{where}; images and labels must match one to one")
        lo, hi = (int(labels.min()), int(labels.max())) if labels.numel() else (0, 0)
        if n_classes == 0:
            if labels.numel() and (lo != -1 or hi != -1):
                raise DatasetCorruptError(f"dataset {name!r} has no classes but its {split} labels are in "
                                          f"[{lo}, {hi}]; an unlabelled set has label -1 everywhere")
        elif lo < 0 or hi >= n_classes:
            bad = int(((labels < 0) | (labels >= n_classes)).sum())
            raise DatasetCorruptError(
                f"dataset {name!r}: {bad} {split} label(s) outside [0, {n_classes}) (found {lo}..{hi}){where}; "
                "the labels file is damaged or belongs to another dataset: replace it with a good copy"
            )
    return splits
