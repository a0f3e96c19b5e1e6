"""scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), always available offline.

Library choices: a fixed stratified split, 25 % test with ``random_state=0`` (1347 train / 450 test); pixel values
0..16 mapped linearly to 0..255 (uint8); no horizontal flip (it changes a digit's meaning).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from batchmates.data.datasets.common import DatasetSource, DatasetSplits, InMemoryImages, _finish_in_memory

__all__ = ["DIGITS", "DIGITS_TEST_FRACTION", "DIGITS_SPLIT_SEED"]

#: The fixed digits split: 25 % test, stratified by class, ``random_state=0`` -> 1347 train / 450 test.
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
_N_DIGITS = 1797


def load_digits(*, data_dir: str | os.PathLike | None, download: bool, image_size: int | None) -> DatasetSplits:
    """The digits split (``data_dir`` and ``download`` are unused: scikit-learn bundles the data)."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    d = sk_load_digits()
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


def describe_digits(data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    n_test = int(np.ceil(_N_DIGITS * DIGITS_TEST_FRACTION))
    return dict(
        name="digits",
        present=True,
        location="bundled with scikit-learn",
        size=f"{_N_DIGITS - n_test} train / {n_test} test images (8x8, 1 channel)",
        how="always available (scikit-learn)",
    )


DIGITS = DatasetSource("digits", load_digits, describe_digits)
