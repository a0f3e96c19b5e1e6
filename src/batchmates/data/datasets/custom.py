"""A user's own torch ``Dataset`` (labelled or not) as batchmates data: :func:`splits_from_datasets`.

```python
from batchmates.data.datasets.custom import splits_from_datasets
splits = splits_from_datasets(my_train, my_test, name="cells")     # items: image or (image, label)
batchmates.training.train(cfg, train_dataset=my_train, test_dataset=my_test)   # the same, inside train
```

Paper: none (library infrastructure).

Library choices:

* **Items.** ``image`` or ``(image, label, ...)``; an image is a PIL image, a ``uint8`` tensor ``[C, H, W]`` or
  ``[H, W]``, a float tensor in ``[0, 1]``, or a numpy array ``[H, W]`` / ``[H, W, C]``. A dataset is unlabelled
  when its first item has no label (or ``None`` or ``-1``); its labels become ``-1`` and ``num_classes`` 0, which
  only self-supervised methods accept.
* **Geometry.** Channels and size come from the first item (or ``in_channels``/``image_size``); other sizes are
  resized like the image folders (shorter side, bilinear, then a centre crop), so every image is
  ``uint8 [C, S, S]``.
* **Memory.** A set of at most 256 MiB as ``uint8`` is decoded once into :class:`InMemoryImages` (batched
  loading and augmentation on the device, label noise); a larger one is decoded per item in DataLoader workers.
* **Statistics.** ``mean``/``std`` per channel from up to 2000 evenly spaced training images, unless given.
  ``num_classes``: given, else ``len(dataset.classes)``, else ``max(dataset.targets) + 1``, else the largest label
  seen + 1 (every item is read once).
* **No test set**: a fixed 20 % of the training set (``random_state=0``) is held out.
* A run trained on such data records ``data: custom:NAME``; ``custom:NAME`` cannot be loaded by name (the
  dataset lives in the user's code), so ``batchmates eval`` asks for the dataset back.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from batchmates.data.datasets.common import (
    DatasetNotFoundError,
    DatasetSource,
    DatasetSplits,
    InMemoryImages,
    _resize_uint8,
    channel_stats,
)

__all__ = ["splits_from_datasets", "UserImages", "CUSTOM", "to_uint8_image"]

_IN_MEMORY_BYTES = 256 * 2**20
_STATS_IMAGES = 2000
_HELD_OUT = 0.2


def to_uint8_image(img: Any) -> torch.Tensor:
    """``uint8 [C, H, W]`` from a PIL image, a tensor (uint8, or float in [0, 1]) or a numpy array."""
    if hasattr(img, "convert") and hasattr(img, "size"):  # PIL
        img = np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img)
    if isinstance(img, np.ndarray):
        arr = np.ascontiguousarray(img)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1) if t.dim() == 3 else t
    elif isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        t = t.unsqueeze(0) if t.dim() == 2 else t
    else:
        raise TypeError(f"a dataset image must be a PIL image, a tensor or a numpy array; got {type(img).__name__}")
    if t.dim() != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"a dataset image must be [C, H, W] (or [H, W, C] numpy) with 1 or 3 channels; got shape "
                         f"{tuple(t.shape)}")
    if t.dtype != torch.uint8:
        if not t.is_floating_point():
            raise TypeError(f"a dataset image tensor must be uint8 or float in [0, 1]; got {t.dtype}")
        t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return t.contiguous()


def _square(t: torch.Tensor, size: int) -> torch.Tensor:
    h, w = t.shape[-2:]
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        t = t[:, top : top + s, left : left + s]
    return _resize_uint8(t.unsqueeze(0), size)[0]


def _split_item(item: Any) -> tuple[Any, int | None]:
    if isinstance(item, tuple | list):
        label = item[1] if len(item) > 1 else None
        return item[0], None if label is None or int(label) < 0 else int(label)
    return item, None


class UserImages(Dataset):
    """A user's dataset whose items are ``(uint8 [C, S, S], label)`` (``-1`` without labels)."""

    def __init__(self, base: Dataset, image_size: int, channels: int) -> None:
        self.base, self.image_size, self.channels = base, int(image_size), int(channels)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, label = _split_item(self.base[index])
        t = to_uint8_image(img)
        if t.shape[0] != self.channels:
            t = t.expand(3, -1, -1) if self.channels == 3 else t.float().mean(0, keepdim=True).round().to(torch.uint8)
        return _square(t, self.image_size).contiguous(), -1 if label is None else label


def _num_classes(ds: Dataset, wrapped: UserImages) -> int:
    classes = getattr(ds, "classes", None)
    if classes is not None and len(classes):
        return len(classes)
    targets = getattr(ds, "targets", None)
    if targets is not None and len(targets):
        return int(max(int(t) for t in targets)) + 1
    return max(int(wrapped[i][1]) for i in range(len(wrapped))) + 1


def _materialise(ds: UserImages) -> InMemoryImages | UserImages:
    n = len(ds)
    if n * ds.channels * ds.image_size**2 > _IN_MEMORY_BYTES:
        return ds
    items = [ds[i] for i in range(n)]
    return InMemoryImages(torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64))


def _sample_images(ds: Dataset, k: int) -> torch.Tensor:
    if isinstance(ds, InMemoryImages):
        idx = np.linspace(0, len(ds) - 1, min(k, len(ds))).round().astype(int)
        return ds.images[torch.as_tensor(idx)]
    idx = np.linspace(0, len(ds) - 1, min(k, len(ds))).round().astype(int)  # type: ignore[arg-type]
    return torch.stack([ds[int(i)][0] for i in idx])


def splits_from_datasets(
    train: Dataset,
    test: Dataset | None = None,
    *,
    name: str = "dataset",
    num_classes: int | None = None,
    image_size: int | None = None,
    in_channels: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> DatasetSplits:
    """A :class:`DatasetSplits` named ``custom:NAME`` from a user's train (and test) ``Dataset`` (see the module)."""
    if isinstance(train, DatasetSplits):
        return train
    if not hasattr(train, "__getitem__") or not hasattr(train, "__len__") or len(train) < 2:  # type: ignore[arg-type]
        raise TypeError("train_dataset must be a map-style torch Dataset (__getitem__ and __len__) with at least 2 "
                        "items; wrap an iterable dataset in a list or a map-style Dataset")
    if not name or ":" in name or name != name.lower():
        raise ValueError(f"name={name!r}: use a lower-case name without ':' (the run records data: custom:NAME)")
    first, label = _split_item(train[0])
    probe = to_uint8_image(first)
    channels = int(in_channels or probe.shape[0])
    size = int(image_size or min(probe.shape[-2:]))
    if channels not in (1, 3) or size < 1:
        raise ValueError(f"in_channels must be 1 or 3 and image_size >= 1; got {channels} and {size}")
    if test is None:
        order = np.random.default_rng(0).permutation(len(train))  # type: ignore[arg-type]
        n_test = max(1, int(round(_HELD_OUT * len(order))))
        train, test = Subset(train, sorted(order[n_test:].tolist())), Subset(train, sorted(order[:n_test].tolist()))
    wrapped_train = UserImages(train, size, channels)
    labeled = label is not None
    if labeled:
        classes = num_classes or _num_classes(train.dataset if isinstance(train, Subset) else train, wrapped_train)
    else:
        classes = 0
    tr, te = _materialise(wrapped_train), _materialise(UserImages(test, size, channels))
    if mean is None or std is None:
        mean, std = channel_stats(_sample_images(tr, _STATS_IMAGES))
    return DatasetSplits(name=f"custom:{name}", train=tr, test=te, num_classes=int(classes), in_channels=channels,
                         image_size=size, mean=tuple(mean), std=tuple(std),
                         classes=tuple(str(i) for i in range(classes)), location="user dataset")


def load_custom(*, argument: str, data_dir: str | os.PathLike | None, download: bool,
                image_size: int | None) -> DatasetSplits:
    raise DatasetNotFoundError(
        f"dataset 'custom:{argument}' was a torch Dataset passed to batchmates.training.train(cfg, "
        "train_dataset=..., test_dataset=...); it cannot be loaded by name. Evaluate in Python: "
        "evaluate_model(Method.from_checkpoint(RUN_DIR), splits_from_datasets(train, test)) "
        "(batchmates.training.evaluate, batchmates.data.datasets.custom); continue an interrupted run with "
        "batchmates.training.resume(RUN_DIR, train_dataset=..., test_dataset=...)"
    )


def describe_custom(data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    return dict(name="custom:NAME", present=True, location="a torch Dataset in your code",
                size="", how="batchmates.training.train(cfg, train_dataset=..., test_dataset=...)")


CUSTOM = DatasetSource("custom", load_custom, describe_custom, argument="NAME")
