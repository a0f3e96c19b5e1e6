"""Shared parts of the dataset package: the containers every loader returns, file locations, resizing.

Library choices (no paper involved):

* Small sets are :class:`InMemoryImages` (``uint8 [N, C, H, W]`` + ``int64 [N]``), sliced into batches and augmented
  on the training device a whole batch at a time; large or variable-size sets are torch ``Dataset`` s whose items
  are decoded to a fixed ``uint8 [C, S, S]`` in DataLoader workers (:class:`DecodedImages`).
* Files are looked for in ``data_dir`` alone when it is given (missing or incomplete files there are an error,
  never a silent fall-back to another copy), else in ``$BATCHMATES_DATA``, then (per dataset) a system location,
  then the download cache :func:`default_cache_dir`; a missing dataset raises :class:`DatasetNotFoundError`
  listing every place searched and how to get the files.
* A dataset is described to the package by a :class:`DatasetSource` (how to load it, how to describe it for
  ``batchmates data list``), registered by name in :mod:`batchmates.data.datasets`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "DatasetNotFoundError",
    "InMemoryImages",
    "DecodedImages",
    "DatasetSplits",
    "DatasetSource",
    "channel_stats",
    "default_cache_dir",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


@dataclass
class DatasetSplits:
    """A dataset ready for training: splits plus what models and augmentations need to know.

    ``mean``/``std`` are per-channel statistics of images scaled to [0, 1] (normalise with
    ``(x / 255 - mean) / std``). ``hflip`` says whether a horizontal flip preserves labels (False for digits).
    ``crop_padding``: the zero padding of the supervised random crop at this image size (None: the augmentation's
    default, ``round(size / 8)``).
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
    crop_padding: int | None = None

    @property
    def in_memory(self) -> bool:
        """True when train and test are :class:`InMemoryImages`."""
        return isinstance(self.train, InMemoryImages) and isinstance(self.test, InMemoryImages)


@dataclass(frozen=True)
class DatasetSource:
    """One dataset as the registry of :mod:`batchmates.data.datasets` knows it.

    Args:
        name: the ``--data`` name (lower case).
        load: ``load(*, data_dir, download, image_size)`` -> :class:`DatasetSplits`; a source with an
            ``argument`` also receives it as ``argument=`` (the text after ``name:``).
        describe: ``describe(data_dir)`` -> one row for ``batchmates data list``: a dict with ``name``,
            ``present``, ``location``, ``size`` and ``how``; fast (nothing decoded).
        aliases: other names accepted for it (``fashion_mnist``).
        argument: the metavariable of a required argument (``"PATH"`` for ``imagefolder:PATH``), else None.
        labeled: False for images without labels (self-supervised pretraining only; labels are ``-1``).
    """

    name: str
    load: Callable[..., DatasetSplits]
    describe: Callable[[str | os.PathLike | None], dict[str, Any]]
    aliases: tuple[str, ...] = ()
    argument: str | None = None
    labeled: bool = True

    @property
    def display_name(self) -> str:
        """``name``, or ``name:ARGUMENT`` for a source that takes an argument."""
        return f"{self.name}:{self.argument}" if self.argument else self.name


# --------------------------------------------------------------------------------------------- helpers
def default_cache_dir() -> Path:
    """Where ``download=True`` stores data when neither ``data_dir`` nor ``$BATCHMATES_DATA`` is set."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchmates" / "data"


def _roots(data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is not None:  # an explicit data_dir is the only place looked (never a silent fall-back elsewhere)
        return [Path(data_dir).expanduser()]
    roots: list[Path] = []
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
    crop_padding: int | None = None,
) -> DatasetSplits:
    native = train.images.shape[-1]
    if crop_padding is not None and image_size is not None:  # the padding scales with the image
        crop_padding = max(1, round(crop_padding * image_size / native))
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
        crop_padding=crop_padding,
    )


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None (native size); got {image_size!r}")


def _missing_row(name: str, looked: Sequence[Path | str], how: str) -> dict[str, Any]:
    """The ``batchmates data list`` row of a dataset whose files were not found."""
    return dict(name=name, present=False, location="looked in: " + ", ".join(str(p) for p in looked), size="", how=how)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
