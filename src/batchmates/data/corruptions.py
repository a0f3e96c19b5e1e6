"""Deterministic domain-shift test sets (for IBAFormer-style generalisation checks, arXiv:2309.06282).

``corrupt(images, kind, severity, seed)`` returns a corrupted copy of a uint8 ``[N, C, H, W]`` test set.
The same ``(images, kind, severity, seed)`` always gives the same bytes (randomness comes from a private,
freshly seeded CPU generator, never the global RNG), and for the random kinds the *same* underlying noise is
scaled by the severity, so the distance from the clean images grows with the severity.

Kinds (strengths modelled on CIFAR-10-C / ImageNet-C, Hendrycks & Dietterich 2019, arXiv:1903.12261; the
exact parameters are library choices):

* ``gaussian_noise``: add N(0, σ²) in [0, 1] units, σ = 0.04, 0.06, 0.08, 0.09, 0.10 (CIFAR-10-C).
* ``gaussian_blur``: separable Gaussian blur, σ = 0.4, 0.6, 0.7, 0.8, 1.0 px at ≤ 32 px (CIFAR-10-C), scaled
  by ``size / 32`` for larger images; reflect padding.
* ``contrast``: ``(x − m)·c + m`` with m the image mean, c = 0.75, 0.5, 0.4, 0.3, 0.15.
* ``elastic``: a smooth random displacement field (white noise blurred with σ = size/8 px, normalised to unit
  RMS), amplitude 2, 4, 6, 8, 10 % of the image side, bilinear resampling with border padding.
* ``invert``: solarise-style partial inversion: pixels ≥ t are inverted, t = 224, 192, 128, 64, 0
  (severity 5 inverts the whole image).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["CORRUPTIONS", "corrupt"]

CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast", "elastic", "invert")

_NOISE_SIGMA = (0.04, 0.06, 0.08, 0.09, 0.10)
_BLUR_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
_ELASTIC_AMP = (0.02, 0.04, 0.06, 0.08, 0.10)
_INVERT_THRESHOLD = (224, 192, 128, 64, 0)
_CHUNK = 1024


def _gauss_kernel(sigma: float, dtype: torch.dtype) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of float ``[N, C, H, W]`` with reflect padding (replicate where too small)."""
    n, c, h, w = x.shape
    k = _gauss_kernel(sigma, x.dtype)
    r = (k.numel() - 1) // 2
    y = x.reshape(n * c, 1, h, w)
    mode_w = "reflect" if r < w else "replicate"
    mode_h = "reflect" if r < h else "replicate"
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode=mode_w), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode=mode_h), k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


def _elastic(x: torch.Tensor, amp: float, g: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    field = torch.randn(n, 2, h, w, generator=g, dtype=x.dtype)
    field = _blur(field, max(1.0, min(h, w) / 8))
    field = field / field.square().mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
    # displacement in pixels -> normalised grid units (align_corners=False: 2/size per pixel)
    disp = field * (amp * max(h, w))
    ys = (torch.arange(h, dtype=x.dtype) + 0.5) * (2.0 / h) - 1
    xs = (torch.arange(w, dtype=x.dtype) + 0.5) * (2.0 / w) - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx + disp[:, 0] * (2.0 / w), gy + disp[:, 1] * (2.0 / h)], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def corrupt(images: torch.Tensor, kind: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Corrupted copy of uint8 ``images [N, C, H, W]`` (same dtype, shape and device), deterministic in ``seed``.

    ``kind`` is one of :data:`CORRUPTIONS`, ``severity`` an int in 1..5. Images are processed in chunks of
    1024 drawing from one generator seeded with ``seed``, so the result does not depend on memory.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 tensor [N, C, H, W]; got {got}")
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption kind {kind!r}; choose one of {list(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an int in 1..5; got {severity!r}")
    s = severity - 1
    device = images.device
    if kind == "invert":
        t = _INVERT_THRESHOLD[s]
        return torch.where(images >= t, 255 - images, images)
    g = torch.Generator().manual_seed(int(seed) * 7919 + CORRUPTIONS.index(kind))
    out = []
    for start in range(0, images.shape[0], _CHUNK):
        x = images[start : start + _CHUNK].cpu().to(torch.float32) / 255.0
        if kind == "gaussian_noise":
            y = x + torch.randn(x.shape, generator=g) * _NOISE_SIGMA[s]
        elif kind == "gaussian_blur":
            y = _blur(x, _BLUR_SIGMA[s] * max(1.0, max(x.shape[-2:]) / 32))
        elif kind == "contrast":
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            y = (x - m) * _CONTRAST[s] + m
        else:  # elastic
            y = _elastic(x, _ELASTIC_AMP[s], g)
        out.append((y * 255.0).round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out).to(device)
