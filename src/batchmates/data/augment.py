"""Batched augmentation on the training device, with independent random parameters per sample.

Images arrive as whole uint8 (or float in [0, 1]) batches ``[B, C, H, W]`` on the training device and leave
as float, normalised ``[B, C, H', W']``. Random parameters are drawn per sample by ``kornia.augmentation``
(``torchvision.transforms.v2`` applied to a batch tensor would share one parameter set across the batch,
which makes the two SimCLR views of every image in a batch use the same crop). All randomness comes from the
global torch RNG, so a step's views are reproducible from ``torch.manual_seed`` (the trainer seeds per step);
nothing here keeps a private generator.

Recipes (``strength``):

* ``"none"``: normalise only.
* ``"weak"``: the supervised recipe: random crop with zero padding ``round(size / 8)`` (1 px at 8×8, 4 px at
  28 and 32) and, if ``hflip``, a horizontal flip (pass ``hflip=False`` for digits, whose labels flips change:
  :class:`~batchmates.data.datasets.DatasetSplits` carries the right default in ``hflip``). By default this is
  :class:`PadCropFlip`, one gather in plain torch; ``backend="kornia"`` gives kornia's ``RandomCrop`` +
  ``RandomHorizontalFlip``, which draw from the same distribution (integer offsets uniform in
  ``[0, 2·padding]``, exact copies of the zero-padded image, no resampling; checked in ``tests/test_augment.py``)
  at about twice the cost (``batchmates bench train``).
* ``"simclr"`` (Chen et al. 2020, arXiv:2002.05709): random resized crop, flip, colour jitter
  (strength 0.5: 0.4/0.4/0.4/0.1, p=0.8; brightness and contrast only for 1-channel images), random grayscale
  (p=0.2, 3-channel only), Gaussian blur (p=0.5) only for images of at least :data:`BLUR_MIN_SIZE` px.
* ``"barlow_a"`` / ``"barlow_b"`` (Zbontar et al. 2021, arXiv:2103.03230, the asymmetric views): crop, flip,
  jitter 0.4/0.4/0.2/0.1 (p=0.8), grayscale p=0.2; blur p=1.0 / 0.1; solarize p=0.0 / 0.2.

Library choices for small images (documented simplifications): Gaussian blur is skipped below
:data:`BLUR_MIN_SIZE` = 64 px, as the CIFAR recipes of SimCLR (its appendix B.9) and solo-learn do at
32 px — a σ up to 2 px blur erases most of a 32 px image (pass ``blur=True`` to force it). The default crop
scale is (0.2, 1.0) from 24 px up and (0.4, 1.0) below (an 8×8 digit cropped to 20 % of its area keeps ~3
pixels). Multi-crop sizes and scales are in :func:`multicrop_sizes` / :func:`multicrop_scales`.
"""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "STRENGTHS",
    "BLUR_MIN_SIZE",
    "BatchAugment",
    "PadCropFlip",
    "BACKENDS",
    "make_augment",
    "eval_transform",
    "TwoViews",
    "MultiCrop",
    "multicrop_sizes",
    "multicrop_scales",
    "to_float01",
]

STRENGTHS = ("none", "weak", "simclr", "barlow_a", "barlow_b")
BACKENDS = ("torch", "kornia")
#: Gaussian blur is applied only to outputs at least this large (see module docstring).
BLUR_MIN_SIZE = 64


def to_float01(x: torch.Tensor, channels: int | None = None, *, name: str = "x") -> torch.Tensor:
    """Validate a ``[B, C, H, W]`` image batch and return it as float in [0, 1] (uint8 is divided by 255)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, C, H, W]; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a batch [B, C, H, W]; got shape {tuple(x.shape)} (add a batch dim?)")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} has {x.shape[1]} channels but the augmentation was built for {channels}")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be uint8 (0..255) or float (0..1); got {x.dtype}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x


def _check_stats(name: str, v: Sequence[float], channels: int) -> tuple[float, ...]:
    t = tuple(float(a) for a in v)
    if len(t) != channels:
        raise ValueError(f"{name} needs one value per channel ({channels}); got {len(t)}: {t}")
    if name == "std" and any(a <= 0 for a in t):
        raise ValueError(f"std values must be > 0; got {t}")
    return t


class BatchAugment(nn.Module):
    """``uint8|float [B, C, H, W] -> float normalised [B, C, S, S]``: ops in order, then ``(x - mean) / std``.

    ``out_size``: when no op fixes the output size, inputs of another size are resized (bilinear,
    antialiased) to it; None keeps the input size.
    """

    def __init__(
        self,
        ops: Sequence[nn.Module],
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        out_size: int | None = None,
    ) -> None:
        super().__init__()
        self.channels = int(channels)
        self.ops = nn.ModuleList(ops)
        self.out_size = out_size
        self.register_buffer("mean", torch.tensor(_check_stats("mean", mean, channels)).view(1, -1, 1, 1), False)
        self.register_buffer("std", torch.tensor(_check_stats("std", std, channels)).view(1, -1, 1, 1), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_float01(x, self.channels)
        for op in self.ops:
            x = op(x)
        if self.out_size is not None and tuple(x.shape[-2:]) != (self.out_size, self.out_size):
            shrink = self.out_size < min(x.shape[-2:])
            x = F.interpolate(x, size=(self.out_size,) * 2, mode="bilinear", align_corners=False, antialias=shrink)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class PadCropFlip(nn.Module):
    """Random crop of ``size`` from the zero-padded batch, then a horizontal flip with probability ``p_flip``.

    Per sample: offsets ``i, j`` uniform in ``[0, 2·padding]`` and a flip; the output is an exact copy of pixels
    of the padded input (one gather, the flip folded into the column index). The draws come from the global torch
    RNG on the batch's device, in the order ``i``, ``j``, flip. Same distribution as kornia's ``RandomCrop``
    (``padding``, zero fill) followed by ``RandomHorizontalFlip``.
    """

    def __init__(self, size: int, padding: int, p_flip: float = 0.5) -> None:
        super().__init__()
        if size < 1 or padding < 0 or not 0.0 <= p_flip <= 1.0:
            raise ValueError(f"PadCropFlip needs size >= 1, padding >= 0 and 0 <= p_flip <= 1; got size={size}, "
                             f"padding={padding}, p_flip={p_flip}")
        self.size, self.padding, self.p_flip = int(size), int(padding), float(p_flip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s, pad, dev = self.size, self.padding, x.device
        if h + 2 * pad < s or w + 2 * pad < s:
            raise ValueError(f"PadCropFlip: a {s}px crop does not fit a {h}x{w} image padded by {pad}")
        xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
        i = torch.randint(0, h + 2 * pad - s + 1, (b,), device=dev)
        j = torch.randint(0, w + 2 * pad - s + 1, (b,), device=dev)
        ar = torch.arange(s, device=dev)
        flip = torch.rand(b, device=dev) < self.p_flip
        cols = j[:, None] + torch.where(flip[:, None], s - 1 - ar, ar)
        rows = i[:, None] + ar
        return xp[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def _blur(size: int, p: float) -> nn.Module:
    k = max(3, int(round(0.1 * size)) | 1)  # ~10 % of the side, odd (SimCLR)
    return K.RandomGaussianBlur((k, k), (0.1, 2.0), p=p)


def _jitter(channels: int, b: float, c: float, s: float, h: float) -> nn.Module:
    if channels == 3:
        return K.ColorJitter(b, c, s, h, p=0.8)
    return K.ColorJitter(b, c, 0.0, 0.0, p=0.8)  # saturation/hue need colour


def make_augment(
    image_size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    strength: str = "none",
    *,
    crop_size: int | None = None,
    crop_scale: tuple[float, float] | None = None,
    hflip: bool = True,
    blur: bool | None = None,
    padding: int | None = None,
    backend: str = "torch",
) -> BatchAugment:
    """Build a batched augmentation (see the module docstring for the recipes).

    Args:
        image_size: side of the input images.
        channels: 1 or 3.
        mean, std: per-channel normalisation of [0, 1] images.
        strength: one of :data:`STRENGTHS`.
        crop_size: output side (default ``image_size``); for "none"/"weak" a resize.
        crop_scale: area range of random resized crops (default (0.2, 1) from 24 px, (0.4, 1) below).
        hflip: random horizontal flips (p=0.5).
        blur: force Gaussian blur on/off (default: on from :data:`BLUR_MIN_SIZE` px).
        padding: "weak" crop padding (default ``round(image_size / 8)``, at least 1).
        backend: "weak" crop and flip in plain torch (``"torch"``, :class:`PadCropFlip`) or kornia's
            ``RandomCrop`` + ``RandomHorizontalFlip`` (``"kornia"``): the same distribution.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}; got {backend!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int; got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels!r}")
    if strength not in STRENGTHS:
        raise ValueError(f"unknown strength {strength!r}; choose one of {list(STRENGTHS)}")
    out = int(crop_size) if crop_size is not None else image_size
    if out < 1:
        raise ValueError(f"crop_size must be a positive int; got {crop_size!r}")
    if crop_scale is None:
        crop_scale = (0.2, 1.0) if image_size >= 24 else (0.4, 1.0)
    lo, hi = (float(v) for v in crop_scale)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1; got {crop_scale!r}")
    use_blur = image_size >= BLUR_MIN_SIZE if blur is None else bool(blur)
    ops: list[nn.Module] = []
    if strength == "weak":
        pad = max(1, round(image_size / 8)) if padding is None else int(padding)
        if backend == "torch":
            ops.append(PadCropFlip(image_size, pad, 0.5 if hflip else 0.0))
        else:
            ops.append(K.RandomCrop((image_size, image_size), padding=pad))
            if hflip:
                ops.append(K.RandomHorizontalFlip())
    elif strength == "simclr":
        ops.append(K.RandomResizedCrop((out, out), scale=(lo, hi)))
        if hflip:
            ops.append(K.RandomHorizontalFlip())
        ops.append(_jitter(channels, 0.4, 0.4, 0.4, 0.1))
        if channels == 3:
            ops.append(K.RandomGrayscale(p=0.2))
        if use_blur:
            ops.append(_blur(out, 0.5))
    elif strength in ("barlow_a", "barlow_b"):
        ops.append(K.RandomResizedCrop((out, out), scale=(lo, hi)))
        if hflip:
            ops.append(K.RandomHorizontalFlip())
        ops.append(_jitter(channels, 0.4, 0.4, 0.2, 0.1))
        if channels == 3:
            ops.append(K.RandomGrayscale(p=0.2))
        if use_blur:
            ops.append(_blur(out, 1.0 if strength == "barlow_a" else 0.1))
        if strength == "barlow_b":
            ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=0.2))  # threshold exactly 0.5
    return BatchAugment(ops, channels, mean, std, out_size=out)


def eval_transform(
    image_size: int, channels: int, mean: Sequence[float], std: Sequence[float], *, resize_to: int | None = None
) -> BatchAugment:
    """Evaluation transform: normalise only (and resize to ``resize_to`` when given, e.g. for large sets)."""
    return make_augment(resize_to or image_size, channels, mean, std, "none")


class TwoViews(nn.Module):
    """Two independently augmented views of a batch: ``x -> (aug1(x), aug2(x))`` (``aug2`` defaults to ``aug1``)."""

    def __init__(self, aug1: nn.Module, aug2: nn.Module | None = None) -> None:
        super().__init__()
        self.aug1 = aug1
        self.aug2 = aug2 if aug2 is not None else aug1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.aug1(x), self.aug2(x)


def multicrop_sizes(image_size: int) -> tuple[int, int]:
    """Library choice of ``(high, low)`` crop sides for SwAV multi-crop at a given input size.

    SwAV uses 224/96 on ImageNet. Ours: 8 -> (8, 6), 28 -> (28, 16), 32 -> (32, 18); from 64 px up, half.
    """
    if image_size <= 12:
        return image_size, max(2, image_size - 2)
    if image_size < 64:
        low = int(round(image_size * 0.57))
        return image_size, low - (low % 2)
    return image_size, image_size // 2


def multicrop_scales(image_size: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Library choice of ``(high_scale, low_scale)`` crop-area ranges for multi-crop.

    SwAV's (0.14, 1) and (0.05, 0.14) for ImageNet-sized images (>= 64 px); (0.25, 1) / (0.08, 0.25) up to
    32 px and (0.4, 1) / (0.15, 0.4) for tiny images (<= 12 px), where a 5 % crop would keep a pixel or two.
    """
    if image_size <= 12:
        return (0.4, 1.0), (0.15, 0.4)
    if image_size < 64:
        return (0.25, 1.0), (0.08, 0.25)
    return (0.14, 1.0), (0.05, 0.14)


class MultiCrop(nn.Module):
    """SwAV multi-crop (Caron et al. 2020, arXiv:2006.09882): ``n_high`` high- then ``n_low`` low-resolution views.

    ``forward(x) -> list[Tensor]``: the first ``n_high`` entries are ``[B, C, high_size, high_size]``, then
    ``n_low`` entries of ``[B, C, low_size, low_size]``. Each crop uses the ``strength`` recipe's colour
    augmentations with its own random parameters. Scales default to :func:`multicrop_scales`.
    """

    def __init__(
        self,
        high_size: int,
        low_size: int,
        n_high: int = 2,
        n_low: int = 4,
        *,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int | None = None,
        high_scale: tuple[float, float] | None = None,
        low_scale: tuple[float, float] | None = None,
        strength: str = "simclr",
        hflip: bool = True,
        blur: bool | None = None,
    ) -> None:
        super().__init__()
        if n_high < 1 or n_low < 0:
            raise ValueError(f"need n_high >= 1 and n_low >= 0; got n_high={n_high}, n_low={n_low}")
        if low_size > high_size:
            raise ValueError(f"low_size ({low_size}) must not exceed high_size ({high_size})")
        if strength not in ("simclr", "barlow_a", "barlow_b"):
            raise ValueError(f"MultiCrop strength must be 'simclr', 'barlow_a' or 'barlow_b'; got {strength!r}")
        src = image_size or high_size
        d_high, d_low = multicrop_scales(src)
        common = dict(hflip=hflip, blur=blur)
        self.high = make_augment(
            src, channels, mean, std, strength, crop_size=high_size, crop_scale=high_scale or d_high, **common
        )
        self.low = make_augment(
            src, channels, mean, std, strength, crop_size=low_size, crop_scale=low_scale or d_low, **common
        )
        self.n_high, self.n_low = int(n_high), int(n_low)
        self.high_size, self.low_size = int(high_size), int(low_size)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.high(x) for _ in range(self.n_high)] + [self.low(x) for _ in range(self.n_low)]
